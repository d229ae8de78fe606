//! The engine's caller side (vLLM's `LLMEngine` / `AsyncLLM` over `EngineCore`): submits
//! prompts, and streams or collects their events, for Rust callers and the Python bindings
//! alike. A [`Client`] pairs an [`Engine`] with a tokenizer; [`Client::stream`] returns a
//! [`Stream`] of events, [`Client::generate`] waits for whole [`Completion`]s. Several
//! prompts are submitted together or not at all: a bad one aborts those already queued.
//! Dropping a `Stream` (or a [`Generation`]) aborts its requests still running.
//!
//! Every wait comes in a bounded form (`*_within`), so a caller that must stay responsive
//! (Python checks for Ctrl-C between waits) never blocks for long; the plain forms block.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

use super::core::{Engine, EngineConfig, Speculative};
use super::request::{Event, FinishReason, Output, RequestId, Sink};
use super::sampling::SamplingParams;

/// What a finished request produced.
#[derive(Debug)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// How it ended: a finish reason, or the error that failed it.
    pub finish: std::result::Result<FinishReason, Error>,
    pub prompt_tokens: usize,
}

impl Completion {
    pub fn generation_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// One bounded wait's outcome on a [`Stream`].
#[derive(Debug)]
pub enum Next {
    /// An event of one of the stream's requests.
    Event(Output),
    /// Nothing arrived in time; the requests are still running.
    Pending,
    /// Every request has ended.
    End,
}

/// The events of a set of requests, in the order the engine produces them. Usable from
/// several threads at once (each event goes to one of them).
pub struct Stream {
    engine: Arc<Engine>,
    ids: Vec<RequestId>,
    rx: Mutex<Receiver<Output>>,
    /// Requests whose last event has not arrived yet.
    open: Mutex<HashSet<RequestId>>,
}

impl Stream {
    /// Ids of the stream's requests, in the order their prompts were given.
    pub fn ids(&self) -> &[RequestId] {
        &self.ids
    }

    /// Waits up to `timeout` for the next event.
    pub fn next_within(&self, timeout: Duration) -> Result<Next> {
        // Another thread may hold the receiver for at most its own `timeout`; whether
        // anything is left to wait for is known only once it is ours (that thread may
        // have taken the last event, after which the channel is closed).
        let rx = self.rx.lock();
        if self.open.lock().is_empty() {
            return Ok(Next::End);
        }
        match rx.recv_timeout(timeout) {
            Ok(out) => {
                if out.event.is_last() {
                    self.open.lock().remove(&out.id);
                }
                Ok(Next::Event(out))
            }
            Err(RecvTimeoutError::Timeout) => Ok(Next::Pending),
            Err(RecvTimeoutError::Disconnected) => {
                self.open.lock().clear();
                Err(Error::Engine("the engine stopped".into()))
            }
        }
    }

    /// Aborts the requests still running; the stream then ends with their abort events.
    pub fn abort(&self) {
        for id in self.open.lock().drain() {
            self.engine.abort(id);
        }
    }
}

impl Iterator for Stream {
    type Item = Result<Output>;

    /// Blocks until the next event; `None` once every request has ended.
    fn next(&mut self) -> Option<Result<Output>> {
        loop {
            match self.next_within(Duration::MAX) {
                Ok(Next::Event(out)) => return Some(Ok(out)),
                Ok(Next::Pending) => {}
                Ok(Next::End) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.abort();
    }
}

/// A request's result as its events arrive.
#[derive(Debug, Default)]
struct Partial {
    text: String,
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    finish: Option<std::result::Result<FinishReason, Error>>,
}

/// Requests being collected into [`Completion`]s.
pub struct Generation {
    stream: Stream,
    index: HashMap<RequestId, usize>,
    results: Vec<Partial>,
}

impl Generation {
    fn new(stream: Stream) -> Self {
        let index = stream
            .ids()
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i))
            .collect();
        let results = stream.ids().iter().map(|_| Partial::default()).collect();
        Generation {
            stream,
            index,
            results,
        }
    }

    pub fn ids(&self) -> &[RequestId] {
        self.stream.ids()
    }

    /// Collects events for up to `timeout`; true once every request has ended.
    pub fn wait_within(&mut self, timeout: Duration) -> Result<bool> {
        // `None`: no deadline (`Duration::MAX` overflows an `Instant`).
        let until = Instant::now().checked_add(timeout);
        loop {
            let left = until.map_or(Duration::MAX, |u| {
                u.saturating_duration_since(Instant::now())
            });
            match self.stream.next_within(left)? {
                Next::Event(out) => self.add(out),
                Next::Pending => return Ok(false),
                Next::End => return Ok(true),
            }
        }
    }

    fn add(&mut self, out: Output) {
        let Some(&i) = self.index.get(&out.id) else {
            return;
        };
        let r = &mut self.results[i];
        match out.event {
            Event::Token(s) => {
                r.text.push_str(&s.text);
                r.token_ids.push(s.token);
                r.prompt_tokens = s.prompt_tokens;
                r.finish = s.finish_reason.map(Ok);
            }
            Event::Aborted => r.finish = Some(Ok(FinishReason::Abort)),
            Event::Failed(e) => r.finish = Some(Err(e)),
        }
    }

    /// Blocks until every request has ended; results in prompt order.
    pub fn wait(mut self) -> Result<Vec<Completion>> {
        while !self.wait_within(Duration::MAX)? {}
        Ok(self.into_completions())
    }

    /// The results so far, in prompt order (complete once `wait_within` returned true); a
    /// request still running is aborted and reports an `Engine` error.
    pub fn into_completions(self) -> Vec<Completion> {
        self.stream.abort();
        self.results
            .into_iter()
            .map(|r| Completion {
                text: r.text,
                token_ids: r.token_ids,
                finish: r.finish.unwrap_or_else(|| {
                    Err(Error::Engine(
                        "the request was abandoned before its end".into(),
                    ))
                }),
                prompt_tokens: r.prompt_tokens,
            })
            .collect()
    }

    /// Aborts the requests still running.
    pub fn abort(&self) {
        self.stream.abort();
    }
}

/// An engine and the tokenizer its requests detokenize with: the API callers generate
/// through.
pub struct Client {
    engine: Arc<Engine>,
    tokenizer: Arc<Tokenizer>,
    /// Requests from [`Client::submit`], until [`Client::take`] claims them.
    pending: Mutex<HashMap<RequestId, Generation>>,
}

impl Client {
    pub fn new(engine: Arc<Engine>, tokenizer: Arc<Tokenizer>) -> Self {
        Client {
            engine,
            tokenizer,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Submits every prompt with its sampling settings (`params`: one for all, or one per
    /// prompt) and returns their stream of events. All or nothing: on a bad request the
    /// ones already queued are aborted and its error returned.
    pub fn stream(&self, prompts: Vec<Vec<u32>>, params: &[SamplingParams]) -> Result<Stream> {
        if params.len() != prompts.len() && params.len() != 1 {
            return Err(Error::param(
                "params",
                format!(
                    "{} sampling settings for {} prompts",
                    params.len(),
                    prompts.len()
                ),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let mut ids = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.into_iter().enumerate() {
            let p = &params[if params.len() == 1 { 0 } else { i }];
            match self.engine.submit(
                prompt,
                p.clone(),
                self.tokenizer.clone(),
                Sink::Blocking(tx.clone()),
            ) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    ids.iter().for_each(|&id| self.engine.abort(id));
                    return Err(e);
                }
            }
        }
        Ok(Stream {
            engine: self.engine.clone(),
            open: Mutex::new(ids.iter().copied().collect()),
            ids,
            rx: Mutex::new(rx),
        })
    }

    /// [`Client::stream`], collected into completions as the events arrive.
    pub fn start(&self, prompts: Vec<Vec<u32>>, params: &[SamplingParams]) -> Result<Generation> {
        Ok(Generation::new(self.stream(prompts, params)?))
    }

    /// Runs every prompt to completion (blocking); results in prompt order.
    pub fn generate(
        &self,
        prompts: Vec<Vec<u32>>,
        params: &[SamplingParams],
    ) -> Result<Vec<Completion>> {
        self.start(prompts, params)?.wait()
    }

    /// Queues one request, to be claimed later by [`Client::take`].
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestId> {
        let generation = self.start(vec![prompt], &[params])?;
        let id = generation.ids()[0];
        self.pending.lock().insert(id, generation);
        Ok(id)
    }

    /// Claims request `id` from [`Client::submit`], to wait for its completion; each id
    /// once.
    pub fn take(&self, id: RequestId) -> Result<Generation> {
        self.pending.lock().remove(&id).ok_or_else(|| {
            Error::param(
                "request_id",
                format!("{id} is not a submitted request waiting to be collected"),
            )
        })
    }

    /// Ends request `id` now and frees its cache blocks; unknown or finished ids are
    /// ignored.
    pub fn abort(&self, id: RequestId) {
        self.engine.abort(id);
    }
}

/// Most engines a model keeps for single-prompt generation (one per speculative setting).
const MAX_SHARED_ENGINES: usize = 4;

/// A model's own engines, each started on first use with the default configuration (and
/// `CANDLE_NUM_PARALLEL`) and a speculative decoding setting: every single-prompt
/// generation on the model with one setting shares one, so threads generating with one
/// model interleave in one batch. Each setting used gets an engine (and a KV cache) of its
/// own; past `MAX_SHARED_ENGINES` the oldest is let go (it stops once its last caller is
/// done), so that a new draft model per call cannot pile engines up.
pub struct SharedEngine {
    model: Arc<Model>,
    engines: Mutex<Vec<Arc<Engine>>>,
}

impl SharedEngine {
    pub fn new(model: Arc<Model>) -> Self {
        SharedEngine {
            model,
            engines: Mutex::new(Vec::new()),
        }
    }

    /// The engine with `speculative` decoding, started now if it is not yet.
    pub fn get(&self, speculative: Option<Speculative>) -> Result<Arc<Engine>> {
        let mut engines = self.engines.lock();
        if let Some(e) = engines
            .iter()
            .find(|e| e.config().speculative == speculative)
        {
            return Ok(e.clone());
        }
        let config = EngineConfig {
            speculative,
            ..EngineConfig::from_env()?
        };
        let e = Arc::new(Engine::new(self.model.clone(), config)?);
        if engines.len() == MAX_SHARED_ENGINES {
            engines.remove(0);
        }
        engines.push(e.clone());
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::grammar::Constraint;
    use crate::engine::testing::{char_tokenizer, tiny_model, word_tokenizer};
    use crate::engine::Speculative;

    fn client(max_batch_size: usize) -> Result<Client> {
        let model = tiny_model("q4g32")?;
        let vocab = model.config.vocab_size;
        let config = EngineConfig {
            max_batch_size,
            kv_cache_tokens: Some(256),
            ..EngineConfig::default()
        };
        let engine = Arc::new(Engine::new(model, config)?);
        Ok(Client::new(engine, word_tokenizer(vocab)))
    }

    /// A client whose requests never end on their own (a rotating cache, no token
    /// limit with `greedy(usize::MAX)`): what a test of aborts needs, since a finite
    /// request may finish on the tiny model before its abort arrives.
    fn endless_client() -> Result<Client> {
        let model = tiny_model("q4g32")?;
        let vocab = model.config.vocab_size;
        let config = EngineConfig {
            max_batch_size: 2,
            kv_cache_tokens: Some(256),
            kv_cache_size: Some(64),
            rotating: true,
            ..EngineConfig::default()
        };
        let engine = Arc::new(Engine::new(model, config)?);
        Ok(Client::new(engine, word_tokenizer(vocab)))
    }

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        }
    }

    /// Waits (up to 10 s) for the engine thread to have handled what it was sent.
    fn settled(client: &Client, done: impl Fn(&crate::engine::Stats) -> bool) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(10);
        while !done(&client.engine().stats()) {
            if Instant::now() > until {
                return Err(Error::Internal(format!(
                    "engine never settled: {:?}",
                    client.engine().stats()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Prompt-lookup speculation leaves greedy output (plain and penalised) exactly as
    /// plain decoding makes it, requests with drafts batched beside requests without;
    /// drafts are proposed and accepted; seeded sampling draws the same tokens too.
    #[test]
    fn speculative_greedy_is_plain_greedy_and_seeds_reproduce() -> Result<()> {
        let model = tiny_model("q4g32")?;
        let vocab = model.config.vocab_size;
        let engine = |speculative| -> Result<Client> {
            let config = EngineConfig {
                max_batch_size: 6,
                kv_cache_tokens: Some(2048),
                speculative,
                ..EngineConfig::default()
            };
            Ok(Client::new(
                Arc::new(Engine::new(model.clone(), config)?),
                word_tokenizer(vocab),
            ))
        };
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 2, 3, 4, 1, 2, 3, 4, 1, 2],
            vec![5, 6, 5, 6, 5, 6, 5],
            vec![9, 8, 7],
            vec![7; 11],
            vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
        ];
        let penalised = SamplingParams {
            repetition_penalty: 1.2,
            ..greedy(40)
        };
        let mut params = vec![greedy(40), greedy(33), penalised, greedy(40), greedy(17)];
        let plain = engine(None)?;
        let spec = engine(Some(Speculative::PromptLookup { num_tokens: 4 }))?;
        let tokens = |c: &[Completion]| c.iter().map(|c| c.token_ids.clone()).collect::<Vec<_>>();
        let want = tokens(&plain.generate(prompts.clone(), &params)?);
        assert_eq!(tokens(&spec.generate(prompts.clone(), &params)?), want);
        let stats = spec.engine().stats();
        assert!(stats.speculative_accepted_tokens > 0, "{stats:?}");
        assert!(stats.speculative_draft_tokens >= stats.speculative_accepted_tokens);
        // Seeded sampling draws what plain decoding draws.
        params = (0..5)
            .map(|i| SamplingParams {
                temperature: 0.9,
                seed: Some(i),
                ..greedy(30)
            })
            .collect();
        let want = tokens(&plain.generate(prompts.clone(), &params)?);
        assert_eq!(tokens(&spec.generate(prompts, &params)?), want);
        Ok(())
    }

    /// Completions come back in prompt order, each with its own settings, and a greedy
    /// request draws the same tokens alone and batched with others.
    #[test]
    fn generate_batches_without_changing_results() -> Result<()> {
        let client = client(4)?;
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4, 5], vec![9, 8], vec![7; 11]];
        let alone = client.generate(vec![prompts[0].clone()], &[greedy(6)])?;
        let params = [greedy(6), greedy(3), greedy(9)];
        let batch = client.generate(prompts.clone(), &params)?;
        assert_eq!(batch.len(), 3);
        for ((c, p), prompt) in batch.iter().zip(&params).zip(&prompts) {
            assert!(
                matches!(c.finish, Ok(FinishReason::Length)),
                "{:?}",
                c.finish
            );
            assert_eq!(c.generation_tokens(), p.max_tokens);
            assert_eq!(c.prompt_tokens, prompt.len());
        }
        assert_eq!(batch[0].token_ids, alone[0].token_ids);
        assert_eq!(batch[0].text, alone[0].text);
        Ok(())
    }

    /// A bad prompt after good ones fails the whole submission and leaves nothing queued.
    #[test]
    fn a_failed_submission_rolls_back() -> Result<()> {
        // The first request can only end by the rollback's abort.
        let client = endless_client()?;
        let vocab = client.engine().model().config.vocab_size as u32;
        let prompts = vec![vec![1, 2, 3], vec![4, vocab]];
        let err = client
            .stream(prompts, &[greedy(usize::MAX)])
            .err()
            .ok_or_else(|| Error::Internal("an out-of-vocabulary prompt was accepted".into()))?;
        assert!(matches!(err, Error::InvalidParam { .. }), "{err:?}");
        settled(&client, |s| s.aborted == 1 && s.waiting + s.running == 0)?;
        let mismatched = client.stream(vec![vec![1], vec![2], vec![3]], &[greedy(1), greedy(1)]);
        assert!(mismatched.is_err(), "2 settings for 3 prompts accepted");
        Ok(())
    }

    /// A stream yields every token then a last event; dropping one early aborts it.
    #[test]
    fn streams_end_and_abort_on_drop() -> Result<()> {
        let client = client(2)?;
        let stream = client.stream(vec![vec![3, 1, 4]], &[greedy(5)])?;
        let id = stream.ids()[0];
        let events = stream.collect::<Result<Vec<_>>>()?;
        assert_eq!(events.len(), 5);
        assert!(events.iter().all(|o| o.id == id));
        assert!(events[..4].iter().all(|o| !o.event.is_last()));
        assert!(events[4].event.is_last());

        let endless = endless_client()?;
        let mut stream = endless.stream(vec![vec![2, 7]], &[greedy(usize::MAX)])?;
        let first = stream.next().transpose()?;
        assert!(matches!(first.map(|o| o.event), Some(Event::Token(_))));
        drop(stream);
        settled(&endless, |s| s.aborted == 1 && s.running == 0)?;

        let id = client.submit(vec![5, 5], greedy(2))?;
        let done = client.take(id)?.wait()?;
        assert_eq!(done[0].generation_tokens(), 2);
        assert!(client.take(id).is_err(), "a request was collected twice");
        Ok(())
    }

    fn constrained(constraint: Constraint, max_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_tokens,
            constraint: Some(constraint),
            ..SamplingParams::default()
        }
    }

    /// A tiny-model client whose tokenizer a grammar can constrain.
    fn char_client() -> Result<Client> {
        let config = EngineConfig {
            max_batch_size: 4,
            kv_cache_tokens: Some(2048),
            ..EngineConfig::default()
        };
        let engine = Arc::new(Engine::new(tiny_model("q4g32")?, config)?);
        Ok(Client::new(engine, char_tokenizer()))
    }

    /// `[a-z]{2,5}-[0-9]{3}`, by hand.
    fn is_code(s: &str) -> bool {
        let Some((word, digits)) = s.split_once('-') else {
            return false;
        };
        (2..=5).contains(&word.len())
            && word.bytes().all(|b| b.is_ascii_lowercase())
            && digits.len() == 3
            && digits.bytes().all(|b| b.is_ascii_digit())
    }

    /// The tiny random model, held to a JSON schema and a regex, greedy and seeded, in one
    /// batch with a free request: every constrained output matches and ends with "stop",
    /// and each request generates what it generates alone.
    #[test]
    fn constrained_outputs_match_their_grammar_in_a_mixed_batch() -> Result<()> {
        let client = char_client()?;
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 0, "maximum": 999},
                "tag": {"enum": ["ab", "cd"]}
            },
            "required": ["n", "tag"],
            "additionalProperties": false
        });
        let schema = Constraint::JsonSchema(Arc::new(schema));
        let seeded = SamplingParams {
            temperature: 0.9,
            seed: Some(11),
            ..constrained(schema.clone(), 400)
        };
        let params = [
            constrained(schema, 400),
            constrained(Constraint::Regex("[a-z]{2,5}-[0-9]{3}".into()), 400),
            SamplingParams {
                max_tokens: 12,
                ..SamplingParams::default()
            },
            seeded,
        ];
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9], vec![10]];
        let batch = client.generate(prompts.clone(), &params)?;
        for (i, c) in batch.iter().enumerate() {
            let alone = client.generate(vec![prompts[i].clone()], &[params[i].clone()])?;
            assert_eq!(alone[0].token_ids, c.token_ids, "request {i}");
        }
        for i in [0, 3] {
            let c = &batch[i];
            assert!(matches!(c.finish, Ok(FinishReason::Stop)), "{:?}", c.finish);
            let v: serde_json::Value = serde_json::from_str(&c.text)
                .unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", c.text));
            let n = v["n"].as_u64().unwrap_or(u64::MAX);
            assert!(n <= 999 && (v["tag"] == "ab" || v["tag"] == "cd"), "{v}");
            assert_eq!(v.as_object().map(serde_json::Map::len), Some(2), "{v}");
        }
        assert!(matches!(batch[1].finish, Ok(FinishReason::Stop)));
        assert!(is_code(&batch[1].text), "{:?}", batch[1].text);
        Ok(())
    }

    /// With `ignore_eos` a constrained request runs until its grammar is complete; a bad
    /// grammar, or a tokenizer no grammar can work with, fails the submission by name.
    #[test]
    fn constraints_end_runs_and_bad_ones_fail_at_submission() -> Result<()> {
        let chars = char_client()?;
        let digits = SamplingParams {
            ignore_eos: true,
            ..constrained(Constraint::Regex("[0-9]{4}".into()), 50)
        };
        let out = chars.generate(vec![vec![1, 2]], std::slice::from_ref(&digits))?;
        assert!(matches!(out[0].finish, Ok(FinishReason::Stop)));
        assert_eq!(out[0].text.len(), 4, "{:?}", out[0].text);
        assert!(out[0].text.bytes().all(|b| b.is_ascii_digit()));
        match chars.generate(
            vec![vec![1]],
            &[constrained(Constraint::Regex("(".into()), 5)],
        ) {
            Err(Error::Grammar { param, .. }) => assert_eq!(param, "regex"),
            other => panic!("{other:?}"),
        }
        let words = client(1)?;
        let e = words.generate(vec![vec![1]], &[digits]).unwrap_err();
        assert!(
            e.to_string().contains("byte-level BPE or SentencePiece"),
            "{e}"
        );
        Ok(())
    }
}
