//! `SamplingParams` and the streaming generator: generation runs on a Rust thread and the
//! Python iterator waits for each step in short slices with the GIL released, checking for
//! signals between slices, so Ctrl-C lands within ~50 ms even during a long prefill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::prelude::*;

use super::errors::panic_error;
use super::model::PyModel;
use super::tokenizer::PyTokenizer;
use crate::engine::{generate, GenerationRequest, SamplingParams, StepOutput};
use crate::error::Error;
use crate::tokenizer::check_token_ids;

/// How long one wait for the next step holds off signal checks.
const POLL: Duration = Duration::from_millis(50);

fn count(param: &str, value: i64) -> Result<usize, Error> {
    usize::try_from(value).map_err(|_| Error::param(param, format!("{value} must not be negative")))
}

/// Sampling settings for one request; every field is validated on construction and a
/// `RequestValidationError` (a `ValueError`) names the field at fault.
#[pyclass(name = "SamplingParams", module = "cortex._core", frozen)]
#[derive(Clone)]
pub struct PySamplingParams {
    pub(crate) inner: SamplingParams,
}

#[pymethods]
impl PySamplingParams {
    #[new]
    #[pyo3(signature = (*, temperature = 0.0, top_k = 0, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0,
        presence_penalty = 0.0, frequency_penalty = 0.0, max_tokens = 256, stop = Vec::new(), seed = None,
        logprobs = None, ignore_eos = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        max_tokens: i64,
        stop: Vec<String>,
        seed: Option<i128>,
        logprobs: Option<i64>,
        ignore_eos: bool,
    ) -> PyResult<Self> {
        if max_tokens < 1 {
            return Err(Error::param(
                "max_tokens",
                format!("must be at least 1, got {max_tokens}"),
            )
            .into());
        }
        let inner = SamplingParams {
            temperature,
            top_k: count("top_k", top_k)?,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            max_tokens: count("max_tokens", max_tokens)?,
            stop,
            seed: SamplingParams::seed_from(seed)?,
            logprobs: logprobs.map(|n| count("logprobs", n)).transpose()?,
            ignore_eos,
        };
        inner.validate()?;
        Ok(PySamplingParams { inner })
    }

    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.temperature
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.inner.top_k
    }
    #[getter]
    fn top_p(&self) -> f32 {
        self.inner.top_p
    }
    #[getter]
    fn min_p(&self) -> f32 {
        self.inner.min_p
    }
    #[getter]
    fn repetition_penalty(&self) -> f32 {
        self.inner.repetition_penalty
    }
    #[getter]
    fn presence_penalty(&self) -> f32 {
        self.inner.presence_penalty
    }
    #[getter]
    fn frequency_penalty(&self) -> f32 {
        self.inner.frequency_penalty
    }
    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }
    #[getter]
    fn stop(&self) -> Vec<String> {
        self.inner.stop.clone()
    }
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.inner.seed
    }
    #[getter]
    fn logprobs(&self) -> Option<usize> {
        self.inner.logprobs
    }
    #[getter]
    fn ignore_eos(&self) -> bool {
        self.inner.ignore_eos
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "SamplingParams(temperature={}, top_k={}, top_p={}, min_p={}, repetition_penalty={}, presence_penalty={}, \
             frequency_penalty={}, max_tokens={}, stop={:?}, seed={:?}, logprobs={:?}, ignore_eos={})",
            p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.max_tokens, p.stop, p.seed, p.logprobs, if p.ignore_eos { "True" } else { "False" }
        )
    }
}

enum Event {
    Step(StepOutput),
    Failed(Error),
}

/// One step as a tuple: (text, token, logprobs, finish_reason, prompt_tokens,
/// generation_tokens, prompt_tps, generation_tps); `logprobs` is None or
/// (logprob, [(token, logprob), ...]).
type StepTuple = (
    String,
    u32,
    Option<(f32, Vec<(u32, f32)>)>,
    Option<&'static str>,
    usize,
    usize,
    f64,
    f64,
);

/// Iterator over the steps of one generation, produced by a Rust worker thread.
#[pyclass(name = "GenerationStream", module = "cortex._core", frozen)]
pub struct PyGenerationStream {
    rx: Mutex<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
}

impl Drop for PyGenerationStream {
    fn drop(&mut self) {
        // An abandoned stream stops its worker at the next forward pass.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

#[pymethods]
impl PyGenerationStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<StepTuple>> {
        let mut guard = self.rx.lock();
        let rx: &mut Receiver<Event> = &mut guard;
        loop {
            let rx = &mut *rx;
            match py.detach(move || rx.recv_timeout(POLL)) {
                Ok(Event::Step(s)) => {
                    let logprobs = s.logprobs.map(|l| (l.logprob, l.top));
                    let finish = s.finish_reason.map(|f| f.as_str());
                    return Ok(Some((
                        s.text,
                        s.token,
                        logprobs,
                        finish,
                        s.prompt_tokens,
                        s.generation_tokens,
                        s.prompt_tps,
                        s.generation_tps,
                    )));
                }
                Ok(Event::Failed(e)) => return Err(e.into()),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.cancel.store(true, Ordering::Relaxed);
                        return Err(interrupt);
                    }
                }
            }
        }
    }

    /// Stops the generation; further iteration ends at once.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Starts generating from `prompt_ids` on a worker thread and returns the step iterator.
#[pyfunction]
pub fn stream(
    model: &PyModel,
    tokenizer: &PyTokenizer,
    prompt_ids: Vec<i64>,
    params: &PySamplingParams,
) -> PyResult<PyGenerationStream> {
    let prompt = check_token_ids(&prompt_ids, model.inner.config.vocab_size, "prompt")?;
    let request = GenerationRequest {
        prompt,
        params: params.inner.clone(),
    };
    let (model, tokenizer) = (model.inner.clone(), tokenizer.inner.clone());
    let cancel = Arc::new(AtomicBool::new(false));
    let worker_cancel = cancel.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("cortex-generate".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                generate(&model, &tokenizer, &request, &worker_cancel, |step| {
                    tx.send(Event::Step(step)).is_ok()
                })
            }))
            .unwrap_or_else(|p| Err(panic_error(p)));
            if let Err(e) = result {
                // The receiver may be gone (stream dropped): nothing left to tell.
                let _ = tx.send(Event::Failed(e));
            }
        })
        .map_err(|e| Error::Engine(format!("could not start the generation thread: {e}")))?;
    Ok(PyGenerationStream {
        rx: Mutex::new(rx),
        cancel,
    })
}
