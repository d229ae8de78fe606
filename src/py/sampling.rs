//! `SamplingParams`: every field validated on construction, with the error naming it.

use std::ffi::CString;

use pyo3::prelude::*;

use std::sync::Arc;

use crate::engine::grammar::Constraint;
use crate::engine::{SamplingArgs, SamplingParams};

/// A `json_schema` argument as JSON: a string is parsed, anything else (a dict) goes through
/// Python's `json.dumps` first.
fn schema_of(py: Python<'_>, schema: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let text: String = match schema.extract::<String>() {
        Ok(text) => text,
        Err(_) => py
            .import("json")?
            .call_method1("dumps", (schema,))
            .map_err(|e| crate::Error::param("json_schema", format!("not JSON: {e}")))?
            .extract()?,
    };
    serde_json::from_str(&text)
        .map_err(|e| crate::Error::param("json_schema", format!("not JSON: {e}")).into())
}

/// `stop` as callers send it: one string (the OpenAI client's form) or a list of strings.
#[derive(FromPyObject)]
enum StopArg {
    One(String),
    Many(Vec<String>),
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
    /// `temperature`, and `do_sample` (transformers: `False` is greedy, and sampling
    /// settings given with it are unused and named in a `cortex.CortexWarning`; `True`
    /// samples at temperature 1.0 and top_k 50 unless they are given). `stop` may be one
    /// string (as the OpenAI client sends it) or a list. The rules are
    /// `crate::engine::SamplingArgs::resolve`'s. At most one of `json_schema` (a dict or a
    /// JSON string), `json_object`, `regex` and `grammar` (Lark) constrains the output.
    #[new]
    #[pyo3(signature = (*, temperature = None, top_k = None, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0,
        presence_penalty = 0.0, frequency_penalty = 0.0, max_tokens = None, stop = None, seed = None,
        logprobs = None, ignore_eos = false, max_new_tokens = None, temp = None, do_sample = None,
        json_schema = None, json_object = false, regex = None, grammar = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        temperature: Option<f32>,
        top_k: Option<i64>,
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
        json_schema: Option<Bound<'_, PyAny>>,
        json_object: bool,
        regex: Option<String>,
        grammar: Option<String>,
    ) -> PyResult<Self> {
        let mut constraints = Vec::new();
        if let Some(schema) = json_schema {
            constraints.push(Constraint::JsonSchema(Arc::new(schema_of(py, &schema)?)));
        }
        if json_object {
            constraints.push(Constraint::JsonObject);
        }
        constraints.extend(regex.map(Constraint::Regex));
        constraints.extend(grammar.map(Constraint::Lark));
        if let [first, second, ..] = &constraints[..] {
            return Err(crate::Error::param(
                second.param(),
                format!(
                    "only one constraint at a time, and {} is given",
                    first.param()
                ),
            )
            .into());
        }
        let resolved = SamplingArgs {
            temperature,
            temp,
            do_sample,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            max_tokens,
            max_new_tokens,
            stop: match stop {
                None => Vec::new(),
                Some(StopArg::One(s)) => vec![s],
                Some(StopArg::Many(v)) => v,
            },
            seed,
            logprobs,
            ignore_eos,
            constraint: constraints.pop(),
        }
        .resolve()?;
        if !resolved.warnings.is_empty() {
            let category = py.import("cortex.exceptions")?.getattr("CortexWarning")?;
            for message in resolved.warnings {
                let message =
                    CString::new(message).map_err(|e| crate::Error::Internal(e.to_string()))?;
                // Level 1: the Python line that built these settings.
                PyErr::warn(py, &category, &message, 1)?;
            }
        }
        Ok(PySamplingParams {
            inner: resolved.params,
        })
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
    /// The JSON schema the output must match, as JSON text.
    #[getter]
    fn json_schema(&self) -> Option<String> {
        match &self.inner.constraint {
            Some(Constraint::JsonSchema(s)) => Some(s.to_string()),
            _ => None,
        }
    }
    #[getter]
    fn json_object(&self) -> bool {
        matches!(self.inner.constraint, Some(Constraint::JsonObject))
    }
    #[getter]
    fn regex(&self) -> Option<String> {
        match &self.inner.constraint {
            Some(Constraint::Regex(r)) => Some(r.clone()),
            _ => None,
        }
    }
    #[getter]
    fn grammar(&self) -> Option<String> {
        match &self.inner.constraint {
            Some(Constraint::Lark(g)) => Some(g.clone()),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        let constraint = match &p.constraint {
            None => String::new(),
            Some(Constraint::JsonSchema(s)) => format!(", json_schema={s}"),
            Some(Constraint::JsonObject) => ", json_object=True".into(),
            Some(Constraint::Regex(r)) => format!(", regex={r:?}"),
            Some(Constraint::Lark(g)) => format!(", grammar=<{} bytes>", g.len()),
        };
        format!(
            "SamplingParams(temperature={}, top_k={}, top_p={}, min_p={}, repetition_penalty={}, presence_penalty={}, \
             frequency_penalty={}, max_tokens={}, stop={:?}, seed={:?}, logprobs={:?}, ignore_eos={}{constraint})",
            p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.max_tokens, p.stop, p.seed, p.logprobs, if p.ignore_eos { "True" } else { "False" }
        )
    }
}
