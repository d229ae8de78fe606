//! `SamplingParams`: every field validated on construction, with the error naming it.

use pyo3::prelude::*;

use crate::engine::SamplingParams;
use crate::error::Error;

fn count(param: &str, value: i64) -> Result<usize, Error> {
    usize::try_from(value).map_err(|_| Error::param(param, format!("{value} must not be negative")))
}

/// `stop` as callers send it: one string (the OpenAI client's form) or a list of strings.
#[derive(FromPyObject)]
enum StopArg {
    One(String),
    Many(Vec<String>),
}

/// One setting passed under our name (`name`) or another tool's (`alias`): the value given,
/// `None` when neither is, and an error naming both when they disagree.
fn same_setting<T: PartialEq + std::fmt::Display>(
    name: &str,
    value: Option<T>,
    alias: &str,
    alias_value: Option<T>,
) -> Result<Option<T>, Error> {
    match (value, alias_value) {
        (Some(a), Some(b)) if a != b => Err(Error::param(
            alias,
            format!("{alias}={b} and {name}={a} are the same setting; pass one of them"),
        )),
        (a, b) => Ok(a.or(b)),
    }
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
    /// Besides our names, three other tools' names are accepted, so their users' calls run
    /// unchanged: `max_new_tokens` (transformers) for `max_tokens`, `temp` (mlx-lm) for
    /// `temperature`, and `do_sample` (transformers: `False` is greedy, `True` samples at
    /// temperature 1.0 unless one is given). `stop` may be one string (as the OpenAI client
    /// sends it) or a list.
    #[new]
    #[pyo3(signature = (*, temperature = None, top_k = 0, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0,
        presence_penalty = 0.0, frequency_penalty = 0.0, max_tokens = None, stop = None, seed = None,
        logprobs = None, ignore_eos = false, max_new_tokens = None, temp = None, do_sample = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: Option<f32>,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        max_tokens: Option<i64>,
        stop: Option<StopArg>,
        seed: Option<i128>,
        logprobs: Option<i64>,
        ignore_eos: bool,
        max_new_tokens: Option<i64>,
        temp: Option<f32>,
        do_sample: Option<bool>,
    ) -> PyResult<Self> {
        let max_tokens = same_setting("max_tokens", max_tokens, "max_new_tokens", max_new_tokens)?
            .unwrap_or(256);
        let temperature = same_setting("temperature", temperature, "temp", temp)?;
        let temperature = match (do_sample, temperature) {
            (None, t) => t.unwrap_or(0.0),
            (Some(false), Some(t)) if t != 0.0 => {
                return Err(Error::param(
                    "do_sample",
                    format!("do_sample=False asks for greedy decoding, but temperature={t}; pass one of them"),
                )
                .into());
            }
            (Some(false), _) => 0.0,
            (Some(true), Some(0.0)) => {
                return Err(Error::param(
                    "do_sample",
                    "do_sample=True needs a temperature above 0 (temperature=0 is greedy decoding)",
                )
                .into());
            }
            (Some(true), t) => t.unwrap_or(1.0),
        };
        let stop = match stop {
            None => Vec::new(),
            Some(StopArg::One(s)) => vec![s],
            Some(StopArg::Many(v)) => v,
        };
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
