//! `Engine` and its event stream. The engine runs on its own Rust thread; Python callers
//! wait for events in short slices with the GIL released, checking for signals between
//! slices, so Ctrl-C lands within ~50 ms: the caller's requests are aborted and the engine
//! goes on serving everyone else.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::model::PyModel;
use super::sampling::PySamplingParams;
use super::tokenizer::PyTokenizer;
use crate::engine::{Engine, EngineConfig, Event, Output, RequestId, SamplingParams};
use crate::error::Error;
use crate::tokenizer::{check_token_ids, Tokenizer};

/// How long one wait for events holds off signal checks.
const POLL: Duration = Duration::from_millis(50);

/// One event as a tuple: (request_id, text, token, logprobs, finish_reason,
/// prompt_tokens, generation_tokens, prompt_tps, generation_tps, error). `token` is None
/// for an abort or a failure; `logprobs` is None or (logprob, [(token, logprob), ...]);
/// `error` is the exception of a failed request (its finish_reason is "error").
type EventTuple = (
    RequestId,
    String,
    Option<u32>,
    Option<(f32, Vec<(u32, f32)>)>,
    Option<&'static str>,
    usize,
    usize,
    f64,
    f64,
    Option<Py<PyAny>>,
);

fn event_tuple(py: Python<'_>, out: Output) -> EventTuple {
    let id = out.id;
    match out.event {
        Event::Token(s) => (
            id,
            s.text,
            Some(s.token),
            s.logprobs.map(|l| (l.logprob, l.top)),
            s.finish_reason.map(|f| f.as_str()),
            s.prompt_tokens,
            s.generation_tokens,
            s.prompt_tps,
            s.generation_tps,
            None,
        ),
        Event::Aborted => (
            id,
            String::new(),
            None,
            None,
            Some("abort"),
            0,
            0,
            0.0,
            0.0,
            None,
        ),
        Event::Failed(e) => {
            let err = PyErr::from(e).into_value(py).into_any();
            (
                id,
                String::new(),
                None,
                None,
                Some("error"),
                0,
                0,
                0.0,
                0.0,
                Some(err),
            )
        }
    }
}

/// Whether this event is the request's last.
fn is_last(out: &Output) -> bool {
    match &out.event {
        Event::Token(s) => s.finish_reason.is_some(),
        Event::Aborted | Event::Failed(_) => true,
    }
}

/// Submits every prompt with its parameters (one for all, or one each), all reporting to
/// one channel; on a bad request, the ones already submitted are aborted and the error
/// raised. Every Python entry point submits through here.
fn submit_all(
    engine: &Engine,
    tokenizer: &Arc<Tokenizer>,
    prompts: Vec<Vec<i64>>,
    params: &[SamplingParams],
) -> PyResult<(Vec<RequestId>, Receiver<Output>)> {
    if params.len() != prompts.len() && params.len() != 1 {
        return Err(Error::param(
            "params",
            format!(
                "{} sampling settings for {} prompts",
                params.len(),
                prompts.len()
            ),
        )
        .into());
    }
    let vocab = engine.model().config.vocab_size;
    let (tx, rx) = mpsc::channel();
    let mut ids = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let p = &params[if params.len() == 1 { 0 } else { i }];
        let submitted = check_token_ids(prompt, vocab, "prompt")
            .and_then(|prompt| engine.submit(prompt, p.clone(), tokenizer.clone(), tx.clone()));
        match submitted {
            Ok(id) => ids.push(id),
            Err(e) => {
                ids.iter().for_each(|&id| engine.abort(id));
                return Err(e.into());
            }
        }
    }
    Ok((ids, rx))
}

/// Iterator over the events of a set of requests, in the order the engine produces them.
/// Dropping it (or `cancel()`) aborts the requests still running.
#[pyclass(name = "EngineStream", module = "cortex._core", frozen)]
pub struct PyEngineStream {
    engine: Arc<Engine>,
    rx: Mutex<Receiver<Output>>,
    open: Mutex<HashSet<RequestId>>,
    ids: Vec<RequestId>,
    /// A single-request stream raises its request's error instead of yielding it.
    raise_errors: bool,
}

impl PyEngineStream {
    fn new(
        engine: Arc<Engine>,
        ids: Vec<RequestId>,
        rx: Receiver<Output>,
        raise_errors: bool,
    ) -> Self {
        PyEngineStream {
            engine,
            rx: Mutex::new(rx),
            open: Mutex::new(ids.iter().copied().collect()),
            ids,
            raise_errors,
        }
    }

    fn abort_open(&self) {
        for id in self.open.lock().drain() {
            self.engine.abort(id);
        }
    }
}

impl Drop for PyEngineStream {
    fn drop(&mut self) {
        self.abort_open();
    }
}

#[pymethods]
impl PyEngineStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<EventTuple>> {
        // In a child forked after the engine started, no engine thread will ever answer.
        crate::threads::check_not_forked()?;
        // Another thread may be waiting on this stream with the GIL released: wait for it
        // without holding the GIL, or it could never take the GIL back.
        let mut guard = loop {
            if let Some(guard) = self.rx.try_lock() {
                break guard;
            }
            py.detach(|| std::thread::sleep(Duration::from_millis(1)));
        };
        loop {
            if self.open.lock().is_empty() {
                return Ok(None);
            }
            let rx: &mut Receiver<Output> = &mut guard;
            match py.detach(move || rx.recv_timeout(POLL)) {
                Ok(out) => {
                    if is_last(&out) {
                        self.open.lock().remove(&out.id);
                    }
                    if let (true, Event::Failed(_)) = (self.raise_errors, &out.event) {
                        if let Event::Failed(e) = out.event {
                            return Err(e.into());
                        }
                    }
                    return Ok(Some(event_tuple(py, out)));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.open.lock().clear();
                    return Err(Error::Engine("the engine stopped".into()).into());
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.abort_open();
                        return Err(interrupt);
                    }
                }
            }
        }
    }

    /// Aborts the requests still running; iteration then ends with their abort events.
    fn cancel(&self) {
        self.abort_open();
    }

    /// Ids of the stream's requests, in the order they were given.
    #[getter]
    fn request_ids(&self) -> Vec<RequestId> {
        self.ids.clone()
    }
}

/// What a finished request produced: (text, token_ids, finish_reason, prompt_tokens,
/// generation_tokens, error).
type ResultTuple = (
    String,
    Vec<u32>,
    &'static str,
    usize,
    usize,
    Option<Py<PyAny>>,
);

#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<u32>,
    finish: Option<&'static str>,
    prompt_tokens: usize,
    error: Option<Error>,
}

/// Waits until every request in `ids` has finished, with the GIL released except for a
/// signal check every `POLL`; Ctrl-C aborts them all.
fn collect(
    py: Python<'_>,
    engine: &Engine,
    rx: &mut Receiver<Output>,
    ids: &[RequestId],
) -> PyResult<Vec<ResultTuple>> {
    let index: HashMap<RequestId, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let mut results: Vec<Collected> = ids.iter().map(|_| Collected::default()).collect();
    let mut open = ids.len();
    while open > 0 {
        // `Receiver` is not `Sync`: move mutable borrows in, which are `Send`.
        let (rx, open, results, index) = (&mut *rx, &mut open, &mut results, &index);
        let slice = py.detach(move || -> Result<(), RecvTimeoutError> {
            let until = Instant::now() + POLL;
            while *open > 0 {
                let out = rx.recv_timeout(until.saturating_duration_since(Instant::now()))?;
                let Some(&i) = index.get(&out.id) else {
                    continue;
                };
                let r = &mut results[i];
                if is_last(&out) {
                    *open -= 1;
                }
                match out.event {
                    Event::Token(s) => {
                        r.text.push_str(&s.text);
                        r.tokens.push(s.token);
                        r.prompt_tokens = s.prompt_tokens;
                        r.finish = s.finish_reason.map(|f| f.as_str());
                    }
                    Event::Aborted => r.finish = Some("abort"),
                    Event::Failed(e) => {
                        r.finish = Some("error");
                        r.error = Some(e);
                    }
                }
            }
            Ok(())
        });
        match slice {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Engine("the engine stopped".into()).into())
            }
        }
        if let Err(interrupt) = py.check_signals() {
            ids.iter().for_each(|&id| engine.abort(id));
            return Err(interrupt);
        }
    }
    Ok(results
        .into_iter()
        .map(|r| {
            let n = r.tokens.len();
            let err = r.error.map(|e| PyErr::from(e).into_value(py).into_any());
            (
                r.text,
                r.tokens,
                r.finish.unwrap_or("error"),
                r.prompt_tokens,
                n,
                err,
            )
        })
        .collect())
}

/// A continuous-batching engine over one model (see `cortex.Engine`, which wraps it).
#[pyclass(name = "Engine", module = "cortex._core", frozen)]
pub struct PyEngine {
    engine: Arc<Engine>,
    tokenizer: Arc<Tokenizer>,
    /// Channels of requests from `submit`, until `wait` claims them.
    pending: Mutex<HashMap<RequestId, Receiver<Output>>>,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, tokenizer, *, max_batch_size = None, kv_cache_tokens = None,
        memory_fraction = None, block_size = 16, max_num_batched_tokens = 256, kv_cache_size = None,
        rotating_kv_cache = false))]
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
            max_seq_len: kv_cache_size,
            rotating: rotating_kv_cache,
        };
        Ok(PyEngine {
            engine: Arc::new(Engine::new(model.inner.clone(), config)?),
            tokenizer: tokenizer.inner.clone(),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Queues one request and returns its id; `wait(id)` collects its result.
    fn submit(&self, prompt_ids: Vec<i64>, params: &PySamplingParams) -> PyResult<RequestId> {
        let params = [params.inner.clone()];
        let (ids, rx) = submit_all(&self.engine, &self.tokenizer, vec![prompt_ids], &params)?;
        self.pending.lock().insert(ids[0], rx);
        Ok(ids[0])
    }

    /// Waits for a request from `submit` to finish and returns its result.
    fn wait(&self, py: Python<'_>, request_id: RequestId) -> PyResult<ResultTuple> {
        let mut rx = self.pending.lock().remove(&request_id).ok_or_else(|| {
            Error::param(
                "request_id",
                format!("{request_id} is not a submitted request waiting to be collected"),
            )
        })?;
        let mut results = collect(py, &self.engine, &mut rx, &[request_id])?;
        results
            .pop()
            .ok_or_else(|| Error::Internal("no result".into()).into())
    }

    /// Runs every prompt to completion with the GIL released; results in input order.
    fn generate_batch(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<i64>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<Vec<ResultTuple>> {
        let params: Vec<SamplingParams> = params.iter().map(|p| p.inner.clone()).collect();
        let (ids, mut rx) = submit_all(&self.engine, &self.tokenizer, prompts, &params)?;
        collect(py, &self.engine, &mut rx, &ids)
    }

    /// Submits every prompt and returns the stream of their events.
    fn stream(
        &self,
        prompts: Vec<Vec<i64>>,
        params: Vec<PyRef<'_, PySamplingParams>>,
    ) -> PyResult<PyEngineStream> {
        let params: Vec<SamplingParams> = params.iter().map(|p| p.inner.clone()).collect();
        let (ids, rx) = submit_all(&self.engine, &self.tokenizer, prompts, &params)?;
        Ok(PyEngineStream::new(self.engine.clone(), ids, rx, false))
    }

    /// Aborts a request and frees its cache blocks at once; unknown or finished ids are
    /// ignored.
    fn abort(&self, request_id: RequestId) {
        self.engine.abort(request_id);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.engine)
    }
}

fn stats_dict<'py>(py: Python<'py>, engine: &Engine) -> PyResult<Bound<'py, PyDict>> {
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
    for (name, lat) in [("ttft", &s.ttft), ("itl", &s.itl)] {
        for (q, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            d.set_item(format!("{name}_{label}_s"), lat.quantile(q))?;
        }
    }
    d.set_item("kv_blocks_total", s.kv_blocks_total)?;
    d.set_item("kv_blocks_free", s.kv_blocks_free)?;
    d.set_item("kv_block_size", s.kv_block_size)?;
    d.set_item("kv_usage", s.kv_usage())?;
    Ok(d)
}

/// Streams one prompt on the model's own engine (started on first use): what
/// `cortex.stream_generate` runs on. Its failure is raised by the iterator.
#[pyfunction]
pub fn stream(
    model: &PyModel,
    tokenizer: &PyTokenizer,
    prompt_ids: Vec<i64>,
    params: &PySamplingParams,
) -> PyResult<PyEngineStream> {
    let engine = model.engine()?;
    let params = [params.inner.clone()];
    let (ids, rx) = submit_all(&engine, &tokenizer.inner, vec![prompt_ids], &params)?;
    Ok(PyEngineStream::new(engine, ids, rx, true))
}

/// Statistics of the model's own engine (the one `stream` uses).
#[pyfunction]
pub fn engine_stats<'py>(py: Python<'py>, model: &PyModel) -> PyResult<Bound<'py, PyDict>> {
    stats_dict(py, model.engine()?.as_ref())
}
