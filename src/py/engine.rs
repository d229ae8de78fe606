//! `Engine`, its event stream and the one-prompt `stream` over a model's own engine:
//! argument and result conversion around [`crate::engine::client`]. Waits run with the GIL
//! released in slices of `POLL`, with a signal check between slices, so Ctrl-C lands
//! within ~50 ms: the caller's requests are aborted and the engine goes on serving
//! everyone else.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_detached;
use super::model::PyModel;
use super::sampling::PySamplingParams;
use super::tokenizer::PyTokenizer;
use crate::engine::core::{
    DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_SPECULATIVE_TOKENS,
};
use crate::engine::{
    Client, Completion, Engine, EngineConfig, Event, Generation, Next, Output, RequestId,
    SamplingParams, Speculative, Stream,
};
use crate::tokenizer::check_token_ids;

/// How long one wait for events holds off signal checks.
const POLL: Duration = Duration::from_millis(50);

/// One event of a request: new text and the token that produced it, or its end.
#[pyclass(name = "Event", module = "cortex._core", frozen, get_all)]
pub struct PyEvent {
    request_id: RequestId,
    /// Text completed by this event (may be empty).
    text: String,
    /// The sampled token; `None` for an abort or a failure.
    token: Option<u32>,
    /// `(logprob, [(token, logprob), ...])` when logprobs were asked for.
    logprobs: Option<(f32, Vec<(u32, f32)>)>,
    /// `None` until the request's last event, then "stop", "length", "abort" or "error".
    finish_reason: Option<&'static str>,
    prompt_tokens: usize,
    generation_tokens: usize,
    prompt_tps: f64,
    generation_tps: f64,
    /// The exception of a failed request (`finish_reason == "error"`).
    error: Option<Py<PyAny>>,
}

impl PyEvent {
    fn new(py: Python<'_>, out: Output) -> Self {
        let ended = |finish_reason, error| PyEvent {
            request_id: out.id,
            text: String::new(),
            token: None,
            logprobs: None,
            finish_reason: Some(finish_reason),
            prompt_tokens: 0,
            generation_tokens: 0,
            prompt_tps: 0.0,
            generation_tps: 0.0,
            error,
        };
        match out.event {
            Event::Token(s) => PyEvent {
                request_id: out.id,
                text: s.text,
                token: Some(s.token),
                logprobs: s.logprobs.map(|l| (l.logprob, l.top)),
                finish_reason: s
                    .finish_reason
                    .map(super::super::engine::request::FinishReason::as_str),
                prompt_tokens: s.prompt_tokens,
                generation_tokens: s.generation_tokens,
                prompt_tps: s.prompt_tps,
                generation_tps: s.generation_tps,
                error: None,
            },
            Event::Aborted => ended("abort", None),
            Event::Failed(e) => ended("error", Some(PyErr::from(e).into_value(py).into_any())),
        }
    }
}

#[pymethods]
impl PyEvent {
    fn __repr__(&self) -> String {
        format!(
            "Event(request_id={}, text={:?}, token={:?}, finish_reason={:?})",
            self.request_id, self.text, self.token, self.finish_reason
        )
    }
}

/// What a finished request produced.
#[pyclass(name = "Completion", module = "cortex._core", frozen, get_all)]
pub struct PyCompletion {
    text: String,
    token_ids: Vec<u32>,
    /// "stop", "length", "abort" or "error".
    finish_reason: &'static str,
    prompt_tokens: usize,
    generation_tokens: usize,
    /// The exception of a failed request (`finish_reason == "error"`).
    error: Option<Py<PyAny>>,
}

impl PyCompletion {
    fn new(py: Python<'_>, c: Completion) -> Self {
        let generation_tokens = c.generation_tokens();
        let (finish_reason, error) = match c.finish {
            Ok(reason) => (reason.as_str(), None),
            Err(e) => ("error", Some(PyErr::from(e).into_value(py).into_any())),
        };
        PyCompletion {
            text: c.text,
            token_ids: c.token_ids,
            finish_reason,
            prompt_tokens: c.prompt_tokens,
            generation_tokens,
            error,
        }
    }
}

/// A prompt from Python as token ids, checked against the vocabulary.
fn prompt(engine: &Engine, prompt: &[i64]) -> crate::Result<Vec<u32>> {
    check_token_ids(prompt, engine.model().config.vocab_size, "prompt")
}

/// [`prompt`] for each of `prompts`.
fn prompts(engine: &Engine, prompts: &[Vec<i64>]) -> crate::Result<Vec<Vec<u32>>> {
    prompts.iter().map(|p| prompt(engine, p)).collect()
}

fn sampling(params: &[PyRef<'_, PySamplingParams>]) -> Vec<SamplingParams> {
    params.iter().map(|p| p.inner.clone()).collect()
}

/// Waits for every request of `generation` with the GIL released, a signal check between
/// slices (Ctrl-C aborts them all), and returns their completions in prompt order.
fn wait(py: Python<'_>, mut generation: Generation) -> PyResult<Vec<PyCompletion>> {
    loop {
        let g = &mut generation;
        if py.detach(move || g.wait_within(POLL))? {
            break;
        }
        if let Err(interrupt) = py.check_signals() {
            generation.abort();
            return Err(interrupt);
        }
    }
    Ok(generation
        .into_completions()
        .into_iter()
        .map(|c| PyCompletion::new(py, c))
        .collect())
}

/// Iterator over the events of a set of requests, in the order the engine produces them.
/// Dropping it (or `cancel()`) aborts the requests still running.
#[pyclass(name = "EngineStream", module = "cortex._core", frozen)]
pub struct PyEngineStream {
    stream: Stream,
    /// A single-request stream raises its request's error instead of yielding it.
    raise_errors: bool,
}

#[pymethods]
impl PyEngineStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyEvent>> {
        // In a child forked after the engine started, no engine thread will ever answer.
        crate::threads::check_not_forked()?;
        loop {
            // Another thread may be waiting on this stream: wait for it without the GIL.
            let stream = &self.stream;
            match py.detach(move || stream.next_within(POLL))? {
                Next::Event(out) => {
                    return match out.event {
                        Event::Failed(e) if self.raise_errors => Err(e.into()),
                        _ => Ok(Some(PyEvent::new(py, out))),
                    };
                }
                Next::End => return Ok(None),
                Next::Pending => {
                    if let Err(interrupt) = py.check_signals() {
                        self.stream.abort();
                        return Err(interrupt);
                    }
                }
            }
        }
    }

    /// Aborts the requests still running; iteration then ends with their abort events.
    fn cancel(&self) {
        self.stream.abort();
    }

    /// Ids of the stream's requests, in the order they were given.
    #[getter]
    fn request_ids(&self) -> Vec<RequestId> {
        self.stream.ids().to_vec()
    }
}

/// A continuous-batching engine over one model (see `cortex.Engine`, which wraps it).
#[pyclass(name = "Engine", module = "cortex._core", frozen)]
pub struct PyEngine {
    pub(crate) client: Client,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, tokenizer, *, max_batch_size = None, kv_cache_tokens = None,
        memory_fraction = None, block_size = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS, kv_cache_size = None,
        rotating_kv_cache = false, prefix_caching = true, sliding_window_eviction = true,
        speculative = None, num_speculative_tokens = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &PyModel,
        tokenizer: &PyTokenizer,
        max_batch_size: Option<usize>,
        kv_cache_tokens: Option<usize>,
        memory_fraction: Option<f64>,
        block_size: usize,
        max_num_batched_tokens: usize,
        kv_cache_size: Option<usize>,
        rotating_kv_cache: bool,
        prefix_caching: bool,
        sliding_window_eviction: bool,
        speculative: Option<&Bound<'_, PyAny>>,
        num_speculative_tokens: Option<usize>,
    ) -> PyResult<Self> {
        // Without a batch size, CANDLE_NUM_PARALLEL's or the default (the env is not read
        // when one is given).
        let max_batch_size = match max_batch_size {
            Some(n) => n,
            None => EngineConfig::from_env()?.max_batch_size,
        };
        let config = EngineConfig {
            max_batch_size,
            kv_cache_tokens,
            memory_fraction,
            block_size,
            max_num_batched_tokens,
            kv_cache_size,
            rotating: rotating_kv_cache,
            prefix_caching,
            sliding_window_eviction,
            speculative: self::speculative(speculative, num_speculative_tokens)?,
        };
        let engine = Engine::new(model.inner.clone(), config)?;
        Ok(PyEngine {
            client: Client::new(engine.into(), tokenizer.inner.clone()),
        })
    }

    /// Queues one request and returns its id; `wait(id)` collects its result.
    fn submit(&self, prompt: Vec<i64>, params: &PySamplingParams) -> PyResult<RequestId> {
        let prompt = self::prompt(self.client.engine(), &prompt)?;
        Ok(self.client.submit(prompt, params.inner.clone())?)
    }

    /// Waits for a request from `submit` to finish and returns its result.
    fn wait(&self, py: Python<'_>, request_id: RequestId) -> PyResult<PyCompletion> {
        let generation = self.client.take(request_id)?;
        wait(py, generation)?
            .pop()
            .ok_or_else(|| crate::Error::Internal("no result".into()).into())
    }

    /// Runs every prompt to completion with the GIL released; results in input order.
    fn generate_batch(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<i64>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<Vec<PyCompletion>> {
        let prompts = self::prompts(self.client.engine(), &prompts)?;
        let generation = self.client.start(prompts, &sampling(&params))?;
        wait(py, generation)
    }

    /// Submits every prompt and returns the stream of their events.
    fn stream(
        &self,
        prompts: Vec<Vec<i64>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<PyEngineStream> {
        let prompts = self::prompts(self.client.engine(), &prompts)?;
        Ok(PyEngineStream {
            stream: self.client.stream(prompts, &sampling(&params))?,
            raise_errors: false,
        })
    }

    /// Aborts a request and frees its cache blocks at once; unknown or finished ids are
    /// ignored.
    fn abort(&self, request_id: RequestId) {
        self.client.abort(request_id);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.client.engine())
    }

    /// Saves the cached keys and values of the prompt's full blocks to `path` (computing
    /// them first if needed); returns the tokens saved.
    fn save_prefix(&self, py: Python<'_>, prompt: Vec<i64>, path: PathBuf) -> PyResult<usize> {
        let prompt = self::prompt(self.client.engine(), &prompt)?;
        run_detached(py, || self.client.save_prefix(&prompt, &path))
    }

    /// Puts a prefix saved by `save_prefix` into the cache; returns its tokens.
    fn load_prefix(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        run_detached(py, || self.client.load_prefix(&path))
    }

    /// Most requests running at once.
    #[getter]
    fn max_batch_size(&self) -> usize {
        self.client.engine().config().max_batch_size
    }
}

pub(crate) fn stats_dict<'py>(py: Python<'py>, engine: &Engine) -> PyResult<Bound<'py, PyDict>> {
    let s = engine.stats();
    let d = PyDict::new(py);
    d.set_item("requests_waiting", s.waiting)?;
    d.set_item("requests_running", s.running)?;
    d.set_item("requests_finished", s.finished)?;
    d.set_item("requests_aborted", s.aborted)?;
    d.set_item("requests_failed", s.failed)?;
    d.set_item("preemptions", s.preemptions)?;
    d.set_item("steps", s.steps)?;
    d.set_item("prompt_tokens", s.prompt_tokens)?;
    d.set_item("generation_tokens", s.generation_tokens)?;
    d.set_item("prompt_tps", s.prompt_tps())?;
    d.set_item("generation_tps", s.generation_tps())?;
    d.set_item("busy_seconds", s.busy_seconds)?;
    d.set_item("mask_seconds", s.mask_seconds)?;
    for (name, lat) in [("ttft", &s.ttft), ("itl", &s.itl)] {
        for (q, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            d.set_item(format!("{name}_{label}_s"), lat.quantile(q))?;
        }
    }
    d.set_item("kv_blocks_total", s.kv_blocks_total)?;
    d.set_item("kv_blocks_free", s.kv_blocks_free)?;
    d.set_item("kv_window_blocks_total", s.kv_window_blocks_total)?;
    d.set_item("kv_window_blocks_free", s.kv_window_blocks_free)?;
    d.set_item("kv_block_size", s.kv_block_size)?;
    d.set_item("kv_usage", s.kv_usage())?;
    d.set_item("prefix_caching", s.prefix_caching)?;
    d.set_item("prefix_cache_queries", s.prefix_cache_queries)?;
    d.set_item("prefix_cache_hits", s.prefix_cache_hits)?;
    d.set_item("prefix_cache_hit_rate", s.prefix_cache_hit_rate())?;
    d.set_item("prefix_cache_blocks", s.prefix_cache_blocks)?;
    d.set_item("speculative_draft_tokens", s.speculative_draft_tokens)?;
    d.set_item("speculative_accepted_tokens", s.speculative_accepted_tokens)?;
    d.set_item(
        "speculative_acceptance_rate",
        s.speculative_acceptance_rate(),
    )?;
    Ok(d)
}

/// The speculative decoding setting `speculative` (a method's name, or a draft `Model`)
/// names, with `num_tokens` draft tokens a step (by default `DEFAULT_SPECULATIVE_TOKENS`).
fn speculative(
    speculative: Option<&Bound<'_, PyAny>>,
    num_tokens: Option<usize>,
) -> PyResult<Option<Speculative>> {
    let Some(s) = speculative else {
        if num_tokens.is_some() {
            let e = crate::Error::param("num_speculative_tokens", "needs speculative");
            return Err(e.into());
        }
        return Ok(None);
    };
    let num_tokens = num_tokens.unwrap_or(DEFAULT_SPECULATIVE_TOKENS);
    if let Ok(draft) = s.cast::<PyModel>() {
        let model = draft.get().inner.clone();
        return Ok(Some(Speculative::draft_model(model, num_tokens)?));
    }
    match s.extract::<String>() {
        Ok(name) => Ok(Some(Speculative::parse(&name, num_tokens)?)),
        Err(_) => Err(crate::Error::param(
            "speculative",
            format!(
                "expected a method's name (\"prompt_lookup\") or a draft Model, got {}",
                s.get_type().name()?
            ),
        )
        .into()),
    }
}

/// Streams one prompt on the model's own engine for the `speculative` setting (started on
/// first use): what `cortex.stream_generate` runs on. Its failure is raised by the
/// iterator.
#[pyfunction]
#[pyo3(signature = (model, tokenizer, prompt, params, *, speculative = None,
    num_speculative_tokens = None))]
pub fn stream(
    model: &PyModel,
    tokenizer: &PyTokenizer,
    prompt: Vec<i64>,
    params: &PySamplingParams,
    speculative: Option<&Bound<'_, PyAny>>,
    num_speculative_tokens: Option<usize>,
) -> PyResult<PyEngineStream> {
    let speculative = self::speculative(speculative, num_speculative_tokens)?;
    let client = Client::new(model.engine(speculative)?, tokenizer.inner.clone());
    let prompt = self::prompt(client.engine(), &prompt)?;
    Ok(PyEngineStream {
        stream: client.stream(vec![prompt], std::slice::from_ref(&params.inner))?,
        raise_errors: true,
    })
}

/// Statistics of the model's own engine for the `speculative` setting (the one `stream`
/// uses with it).
#[pyfunction]
#[pyo3(signature = (model, *, speculative = None, num_speculative_tokens = None))]
pub fn engine_stats<'py>(
    py: Python<'py>,
    model: &PyModel,
    speculative: Option<&Bound<'_, PyAny>>,
    num_speculative_tokens: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let speculative = self::speculative(speculative, num_speculative_tokens)?;
    stats_dict(py, model.engine(speculative)?.as_ref())
}

/// The engine's defaults, exported as `cortex._core.DEFAULT_*` so that Python never
/// repeats them.
pub fn add_defaults(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE)?;
    m.add("DEFAULT_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)?;
    m.add("DEFAULT_SPECULATIVE_TOKENS", DEFAULT_SPECULATIVE_TOKENS)?;
    m.add(
        "DEFAULT_MAX_NUM_BATCHED_TOKENS",
        DEFAULT_MAX_NUM_BATCHED_TOKENS,
    )?;
    Ok(())
}
