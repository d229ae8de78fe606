//! One request's life: its tokens, its state (Waiting → Prefilling → Decoding →
//! Finished | Failed), its own sampler and RNG, and the text it has streamed so far.

use std::borrow::Cow;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

use crate::error::{bail, Error, Result};
use crate::model::Draw;
use crate::tokenizer::{StreamDecoder, Tokenizer};

use super::kv::{extend_hashes, BlockHash};
use super::sampling::{Distribution, Sampler, SamplingParams, TokenLogprobs};

pub type RequestId = u64;

/// Longest and shortest run of recent tokens that prompt lookup looks for.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the sequence filled its context.
    Length,
    /// Aborted by the caller (or its output channel went away).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Where a request is in its life. The order is the only order a request moves in —
/// Waiting → Prefilling → Decoding → Finished | Failed — except that a preemption sends a
/// Prefilling or Decoding request back to Waiting, to be recomputed. The last two are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    /// Queued; holds no cache blocks (also after a preemption).
    Waiting,
    /// Part of the prompt (or, after a preemption, of the recomputed text) is cached.
    Prefilling,
    /// Everything but the newest token is cached; one token per step.
    Decoding,
    Finished(FinishReason),
    Failed,
}

/// What one generated token produced for its request.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Text completed by this step (may be empty while a character or a possible stop
    /// string is incomplete). All steps' texts concatenate to the generated text.
    pub text: String,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    /// Prompt tokens per second, from the request's first scheduled step to its first token.
    pub prompt_tps: f64,
    /// Generated tokens per second since the first token.
    pub generation_tps: f64,
}

#[derive(Debug)]
pub enum Event {
    Token(StepOutput),
    /// Ended by [`super::Engine::abort`]; nothing more follows.
    Aborted,
    /// The request failed; nothing more follows.
    Failed(Error),
}

impl Event {
    /// Whether nothing follows this event for its request.
    pub fn is_last(&self) -> bool {
        match self {
            Event::Token(s) => s.finish_reason.is_some(),
            Event::Aborted | Event::Failed(_) => true,
        }
    }
}

/// An event of request `id`, as its caller receives it.
#[derive(Debug)]
pub struct Output {
    pub id: RequestId,
    pub event: Event,
}

/// Where a request's events go: a blocking channel (the [`super::Client`] callers wait
/// on) or an async one (the server's tasks await it).
#[derive(Debug, Clone)]
pub enum Sink {
    Blocking(mpsc::Sender<Output>),
    Async(tokio::sync::mpsc::UnboundedSender<Output>),
}

impl Sink {
    /// False when the receiving side has gone away.
    fn send(&self, out: Output) -> bool {
        match self {
            Sink::Blocking(tx) => tx.send(out).is_ok(),
            Sink::Async(tx) => tx.send(out).is_ok(),
        }
    }
}

/// Holds back generated text that could be the start of a stop string, and cuts the text
/// at the first stop string found (which may span several tokens).
#[derive(Debug)]
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Adds `piece`; returns the text now safe to emit and whether a stop string ended it.
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string: earlier text
        // can no longer be part of a match.
        let keep = self
            .stops
            .iter()
            .filter_map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let out: String = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    /// Text still held when generation ends for another reason.
    fn release(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What a request samples from.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    /// The newest token's logits, `[vocab]`.
    Logits(&'a [f32]),
    /// The token drawn where they were computed (`u32::MAX`: they held a NaN), for a
    /// request that takes nothing else ([`Request::device_draw`]).
    Drawn(u32),
}

/// A request's grammar state: llguidance's `Matcher` (which has no `Debug`), and the mask
/// for the next token when it was computed ahead, while the forward pass ran.
struct Grammar {
    matcher: Matcher,
    next: Option<Result<SimpleVob>>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl Grammar {
    /// The tokens that may come next; end-of-sequence ids only where the output may end,
    /// and never under `ignore_eos` (generation then runs to completion or `max_tokens`).
    fn mask(&mut self, ignore_eos: bool, eos: &[u32], p: &SamplingParams) -> Result<SimpleVob> {
        let mut mask = self.matcher.compute_mask().map_err(|e| failed(p, &e))?;
        if ignore_eos {
            for &t in eos {
                if (t as usize) < mask.len() {
                    mask.disallow_token(t);
                }
            }
        }
        Ok(mask)
    }

    /// Advances past `token`; true once the output is complete.
    fn consume(&mut self, token: u32, p: &SamplingParams) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| failed(p, &e))?;
        Ok(self.matcher.is_stopped())
    }
}

/// A grammar that failed mid-output (out of its per-token budget, say): this request's
/// fault, named by its parameter.
fn failed(p: &SamplingParams, e: &dyn std::fmt::Display) -> Error {
    Error::Grammar {
        param: p.constraint_param().into(),
        message: format!("the grammar failed while generating: {e}"),
    }
}

#[derive(Debug)]
pub struct Request {
    pub id: RequestId,
    /// The prompt, then every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    /// Leading tokens whose keys and values are in the draft model's cache (speculative
    /// decoding with a draft model; it catches up with `computed` each step).
    pub draft_computed: usize,
    /// This step's proposals from a draft model, one per position from the newest
    /// token's on: each token with the distribution it was drawn from (`None`: greedy,
    /// the draft model's argmax). A sampled request has one more than it carries drafts.
    proposals: Vec<(u32, Option<Distribution>)>,
    /// Names of the full blocks of `tokens` hashed so far ([`Request::hash_blocks`]).
    pub block_hashes: Vec<BlockHash>,
    pub state: RequestState,
    /// The request ends with `length` once this many tokens are cached (the context, or
    /// the most the cache holds for one sequence); `usize::MAX` with a rotating cache.
    pub max_len: usize,
    sampler: Sampler,
    /// Where the output is constrained: the grammar's state after the tokens generated.
    grammar: Option<Grammar>,
    tokenizer: Arc<Tokenizer>,
    detok: StreamDecoder,
    stops: StopMatcher,
    sink: Sink,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

impl Request {
    pub fn new(
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        max_len: usize,
        tokenizer: Arc<Tokenizer>,
        sink: Sink,
    ) -> Self {
        Request {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            draft_computed: 0,
            proposals: Vec::new(),
            block_hashes: Vec::new(),
            state: RequestState::Waiting,
            max_len,
            stops: StopMatcher {
                stops: params.stop.clone(),
                held: String::new(),
            },
            sampler: Sampler::new(params),
            grammar: None,
            tokenizer,
            detok: StreamDecoder::new(),
            sink,
            arrived: Instant::now(),
            first_scheduled: None,
            first_token: None,
            last_token: None,
        }
    }

    /// This request with its output held to `matcher` (compiled from its
    /// `SamplingParams::constraint`).
    #[must_use]
    pub fn with_grammar(mut self, matcher: Matcher) -> Self {
        self.grammar = Some(Grammar {
            matcher,
            next: None,
        });
        self
    }

    /// Whether the output is held to a grammar (its mask is worth computing ahead).
    pub fn is_constrained(&self) -> bool {
        self.grammar.is_some()
    }

    /// Computes the mask for the next token now (the engine does it while the forward
    /// pass runs); [`Request::sample`] takes it. A no-op without a grammar.
    pub fn prepare_mask(&mut self) {
        let p = self.sampler.params();
        if let Some(g) = &mut self.grammar {
            if g.next.is_none() {
                let mask = g.mask(p.ignore_eos, &self.tokenizer.eos_token_ids, p);
                g.next = Some(mask);
            }
        }
    }

    /// Names the full blocks of `block_size` positions within the first `upto` tokens
    /// (each once: tokens never change) and returns how many there are.
    pub fn hash_blocks(&mut self, block_size: usize, upto: usize) -> usize {
        let full = upto.min(self.tokens.len()) / block_size;
        extend_hashes(&mut self.block_hashes, &self.tokens, block_size, full);
        full
    }

    /// Tokens still to run through the model before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, RequestState::Finished(_) | RequestState::Failed)
    }

    /// Samples from the rows of a span that ended in `drafts` (speculative decoding: one
    /// row per draft and one more, the last position's) until a draft is rejected or the
    /// request ends. Returns each token's output, in order: every one but the last is an
    /// accepted draft.
    ///
    /// A draft proposed with certainty (prompt lookup, or a greedy draft model) is kept
    /// when token `i`, drawn from row `i` exactly as plain decoding draws it, is that draft:
    /// for a certain proposal this is the rejection sampling of Leviathan et al. 2023 and
    /// Chen et al. 2023 (kept with probability `p(draft)`; a rejection leaves a token drawn
    /// from `p` without it), and it keeps each draw what plain decoding's is, so a seeded
    /// request gives the same tokens with speculation or without, alone or in any batch. A
    /// draft a draft model sampled from `q` goes through [`Sampler::verify`].
    pub fn sample_span<'a>(
        &mut self,
        rows: impl IntoIterator<Item = Row<'a>>,
        drafts: &[u32],
    ) -> Result<Vec<StepOutput>> {
        let proposals = std::mem::take(&mut self.proposals);
        let mut out = Vec::with_capacity(drafts.len() + 1);
        for (i, row) in rows.into_iter().enumerate() {
            let step = match (row, proposals.get(i)) {
                (Row::Logits(logits), Some(&(draft, Some(ref q)))) => {
                    let (token, logprobs) = self.sampler.verify(
                        logits,
                        &self.tokens,
                        self.prompt_len,
                        self.tokens.len(),
                        (draft, q),
                    )?;
                    self.push(token, logprobs)?
                }
                _ => self.sample(row)?,
            };
            let go_on = step.finish_reason.is_none() && drafts.get(i) == Some(&step.token);
            out.push(step);
            if !go_on {
                break;
            }
        }
        Ok(out)
    }

    /// Whether each token this request samples is drawn by verifying a draft model's
    /// proposal, drafted or not (with a draft model): a sampled request without a grammar.
    /// Its token at a position then depends only on the seed and the two models'
    /// distributions there, not on how many drafts the batch left room for, so a seed
    /// reproduces its output in any batch. Greedy requests keep a draft when it is the
    /// argmax, and constrained ones decode plainly.
    pub fn draws_by_verifying(&self) -> bool {
        self.params().temperature > 0.0 && self.grammar.is_none()
    }

    /// How a pass may draw this request's next token where its logits are, when the
    /// token is all it takes (no grammar, no logprobs), for a span ending in `drafts`
    /// proposals: any span of a plain greedy request (the argmax); a sampled or penalized
    /// one's without drafts (their rows' contexts would hold the drafts), and never a
    /// sampled one's beside a draft model (it verifies the draft model's distribution).
    pub fn device_draw(&self, drafts: usize, draft_model: bool) -> Option<Draw> {
        let p = self.params();
        if self.grammar.is_some() || p.logprobs.is_some() {
            None
        } else if p.is_plain_greedy() {
            Some(Draw::argmax())
        } else if drafts > 0 || (draft_model && p.temperature > 0.0) {
            None
        } else {
            Some(self.sampler.device_draw(&self.tokens, self.prompt_len))
        }
    }

    /// Takes the draft model's next proposal from `row` (its logits after this request's
    /// tokens and the proposals so far).
    pub fn propose_draft(&mut self, row: Row<'_>) -> Result<()> {
        let proposal = match row {
            Row::Drawn(u32::MAX) => bail!(Engine, "the draft model produced NaN logits"),
            Row::Drawn(token) => (token, None),
            // NaN logits fail in the sampler, as the model's own do.
            Row::Logits(logits) => {
                let position = self.tokens.len() + self.proposals.len();
                // Penalties count the proposals so far as generated tokens.
                let mut context = Cow::Borrowed(&self.tokens[..]);
                if self.params().is_penalized() && !self.proposals.is_empty() {
                    let proposed = self.proposals.iter().map(|p| p.0);
                    context.to_mut().extend(proposed);
                }
                (self.sampler).propose(logits, &context, self.prompt_len, position)?
            }
        };
        self.proposals.push(proposal);
        Ok(())
    }

    /// This step's draft-model proposals, in order.
    pub fn proposed(&self) -> impl Iterator<Item = u32> + '_ {
        self.proposals.iter().map(|p| p.0)
    }

    /// Forgets this step's proposals (the draft model failed on them): the step samples
    /// plainly.
    pub fn drop_proposals(&mut self) {
        self.proposals.clear();
    }

    /// Up to `k` tokens that may come next, found by prompt lookup (Saxena 2023; vLLM's
    /// n-gram proposer): the longest of the last `MAX_NGRAM` down to `MIN_NGRAM` tokens
    /// that occurred before, most recent occurrence first, and the tokens that followed
    /// it. None when nothing repeats. O(len · MAX_NGRAM).
    pub fn propose(&self, k: usize) -> Vec<u32> {
        let t = &self.tokens;
        let len = t.len();
        for n in (MIN_NGRAM..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
            let pattern = &t[len - n..];
            // Occurrences ending before the last token, so that one token at least follows.
            if let Some(start) = (0..len - n).rev().find(|&i| t[i..i + n] == *pattern) {
                let from = start + n;
                return t[from..(from + k).min(len)].to_vec();
            }
        }
        Vec::new()
    }

    /// Samples the next token from `row` (the newest token's logits, or the argmax the
    /// forward pass took), detokenizes it and checks the stop conditions.
    pub fn sample(&mut self, row: Row<'_>) -> Result<StepOutput> {
        let ignore_eos = self.sampler.params().ignore_eos;
        let (token, logprobs) = match row {
            Row::Logits(logits) => {
                let mask = match &mut self.grammar {
                    Some(g) => Some(match g.next.take() {
                        Some(ahead) => ahead?,
                        None => g.mask(
                            ignore_eos,
                            &self.tokenizer.eos_token_ids,
                            self.sampler.params(),
                        )?,
                    }),
                    None => None,
                };
                self.sampler
                    .sample(logits, &self.tokens, self.prompt_len, mask.as_ref())?
            }
            Row::Drawn(_) if self.grammar.is_some() || self.params().logprobs.is_some() => {
                bail!(
                    Internal,
                    "request {} was given a drawn token, not logits",
                    self.id
                )
            }
            Row::Drawn(u32::MAX) => bail!(Engine, "the model produced NaN logits"),
            Row::Drawn(token) => (token, None),
        };
        self.push(token, logprobs)
    }

    /// Appends the chosen `token`: advances the grammar, detokenizes, checks the stop
    /// conditions and says what the step produced.
    fn push(&mut self, token: u32, logprobs: Option<TokenLogprobs>) -> Result<StepOutput> {
        let ignore_eos = self.sampler.params().ignore_eos;
        let eos = !ignore_eos && self.tokenizer.eos_token_ids.contains(&token);
        // Complete: the grammar allows nothing more (EOS, which it allowed only here, ends
        // the output as well).
        let complete = match &mut self.grammar {
            Some(g) if !eos => g.consume(token, self.sampler.params())?,
            _ => false,
        };
        self.tokens.push(token);
        let now = Instant::now();
        let first_token = *self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        let params = self.sampler.params();
        let n = self.generated();
        let mut text = String::new();
        let mut finish = None;
        if !eos {
            let (safe, hit) = self.stops.push(&self.detok.push(&self.tokenizer, token)?);
            text = safe;
            finish = hit.then_some(FinishReason::Stop);
        }
        // The newest token needs no cache slot: the sequence is full once every slot is.
        let length = n >= params.max_tokens || self.tokens.len() > self.max_len;
        if finish.is_none() && (eos || complete || length) {
            let (safe, hit) = self.stops.push(&self.detok.flush(&self.tokenizer)?);
            text.push_str(&safe);
            if !hit {
                text.push_str(&self.stops.release());
            }
            finish = Some(if eos || complete || hit {
                FinishReason::Stop
            } else {
                FinishReason::Length
            });
        }
        self.state = match finish {
            Some(reason) => RequestState::Finished(reason),
            None => RequestState::Decoding,
        };
        let scheduled = self.first_scheduled.unwrap_or(self.arrived);
        Ok(StepOutput {
            text,
            token,
            logprobs,
            finish_reason: finish,
            prompt_tokens: self.prompt_len,
            generation_tokens: n,
            prompt_tps: self.prompt_len as f64 / (first_token - scheduled).as_secs_f64().max(1e-9),
            generation_tps: n as f64 / (now - first_token).as_secs_f64().max(1e-3),
        })
    }

    /// Sends an event to the caller; false when the caller has gone away.
    pub fn emit(&self, event: Event) -> bool {
        self.sink.send(Output { id: self.id, event })
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher {
            stops: stops.iter().map(std::string::ToString::to_string).collect(),
            held: String::new(),
        };
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.release());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".to_string(), true)
        );
        assert_eq!(
            run(&["\n\n"], &["one\n", "\ntwo"]),
            ("one".to_string(), true)
        );
    }

    #[test]
    fn partial_match_is_released() {
        assert_eq!(
            run(&["END"], &["abc E", "N"]),
            ("abc EN".to_string(), false)
        );
        assert_eq!(run(&["xyz"], &["é", "ü"]), ("éü".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b c", "a"], &["x a b c"]), ("x ".to_string(), true));
    }
}
