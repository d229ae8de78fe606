//! Maps [`Error`] onto the exception tree of `cortex.exceptions` (defined in Python so
//! classes can subclass both `CortexError` and `ValueError`, `RuntimeError`...), and the
//! one helper every long call goes through.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;

/// Instantiates `cortex.exceptions.<class>(message, **attrs)`.
fn build(
    py: Python<'_>,
    class: &str,
    message: String,
    attrs: &[(&str, Py<PyAny>)],
) -> PyResult<PyErr> {
    let cls = py.import("cortex.exceptions")?.getattr(class)?;
    let kwargs = PyDict::new(py);
    for (k, v) in attrs {
        kwargs.set_item(k, v)?;
    }
    Ok(PyErr::from_value(cls.call((message,), Some(&kwargs))?))
}

/// An attribute set on the exception instance (`path`, `offset`, `field`, `param`...).
type Attr = (&'static str, Py<PyAny>);

/// The `cortex.exceptions` class for `err`, and the attributes it carries.
fn classify(py: Python<'_>, err: &Error) -> PyResult<(&'static str, Vec<Attr>)> {
    let s = |v: &str| v.into_pyobject(py).map(|o| o.into_any().unbind());
    Ok(match err {
        Error::ModelNotFound { path, .. } => (
            "ModelNotFoundError",
            vec![("path", s(&path.display().to_string())?)],
        ),
        Error::ModelFormat { path, offset, .. } => (
            "ModelFormatError",
            vec![
                ("path", s(&path.display().to_string())?),
                ("offset", offset.into_pyobject(py)?.into_any().unbind()),
            ],
        ),
        Error::UnsupportedArchitecture { architecture, .. } => (
            "UnsupportedArchitectureError",
            vec![("architecture", s(architecture)?)],
        ),
        Error::Config { field, .. } => ("ConfigError", vec![("field", s(field)?)]),
        Error::Tokenizer(_) => ("TokenizerError", vec![]),
        Error::Template(_) => ("TemplateError", vec![]),
        Error::InvalidParam { param, .. } => ("RequestValidationError", vec![("param", s(param)?)]),
        Error::Grammar { param, .. } => ("GrammarError", vec![("param", s(param)?)]),
        Error::ContextLength { .. } => ("ContextLengthError", vec![("param", s("prompt")?)]),
        Error::CacheFull { .. } => ("CacheFullError", vec![("param", s("prompt")?)]),
        Error::Cancelled => ("CancelledError", vec![]),
        Error::Engine(_) => ("EngineError", vec![]),
        Error::Conversion(_) => ("ConversionError", vec![]),
        Error::Device(_) => ("DeviceError", vec![]),
        Error::Internal(_) | Error::Candle(_) => ("InternalError", vec![]),
        Error::Io { path, .. } => (
            "ModelLoadError",
            vec![("path", s(&path.display().to_string())?)],
        ),
        Error::SavedPrefix { path, .. } => (
            "SavedPrefixError",
            vec![("path", s(&path.display().to_string())?)],
        ),
    })
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| {
            match classify(py, &err)
                .and_then(|(class, attrs)| build(py, class, err.to_string(), &attrs))
            {
                Ok(e) | Err(e) => e,
            }
        })
    }
}

/// One error of every variant, in declaration order: `test_errors.py` checks that each
/// becomes an instance of an existing `cortex.exceptions` class. The match makes a new
/// variant fail to compile until it has an index here; `test_errors.py` makes it fail
/// until it has a sample.
fn samples() -> Vec<Error> {
    let io = || std::io::Error::other("sample");
    vec![
        Error::ModelNotFound {
            path: "m".into(),
            message: "sample".into(),
        },
        Error::format("m.gguf", Some(4), "sample"),
        Error::UnsupportedArchitecture {
            architecture: "sample".into(),
            supported: vec!["sample".into()],
        },
        Error::config("hidden_size", "sample"),
        Error::Tokenizer("sample".into()),
        Error::Template("sample".into()),
        Error::param("temperature", "sample"),
        Error::Grammar {
            param: "regex".into(),
            message: "sample".into(),
        },
        Error::ContextLength {
            prompt_tokens: 2,
            context_length: 1,
        },
        Error::CacheFull {
            needed: 2,
            capacity: 1,
        },
        Error::Cancelled,
        Error::Engine("sample".into()),
        Error::Conversion("sample".into()),
        Error::Device("sample".into()),
        Error::Internal("sample".into()),
        Error::io("m", io()),
        Error::Candle(candle_core::Error::Msg("sample".into())),
        Error::SavedPrefix {
            path: "p.cxkv".into(),
            message: "sample".into(),
        },
    ]
}

/// Position of `err`'s variant in the declaration order of [`Error`].
fn variant_index(err: &Error) -> usize {
    match err {
        Error::ModelNotFound { .. } => 0,
        Error::ModelFormat { .. } => 1,
        Error::UnsupportedArchitecture { .. } => 2,
        Error::Config { .. } => 3,
        Error::Tokenizer(_) => 4,
        Error::Template(_) => 5,
        Error::InvalidParam { .. } => 6,
        Error::Grammar { .. } => 7,
        Error::ContextLength { .. } => 8,
        Error::CacheFull { .. } => 9,
        Error::Cancelled => 10,
        Error::Engine(_) => 11,
        Error::Conversion(_) => 12,
        Error::Device(_) => 13,
        Error::Internal(_) => 14,
        Error::Io { .. } => 15,
        Error::Candle(_) => 16,
        Error::SavedPrefix { .. } => 17,
    }
}

/// How many variants [`Error`] has: one past the highest index of [`variant_index`].
const VARIANTS: usize = 18;

/// `(number of variants, [(variant index, exception)])` for one error of every variant
/// (see [`samples`]).
#[pyfunction]
pub(crate) fn _error_samples(py: Python<'_>) -> (usize, Vec<(usize, Py<PyAny>)>) {
    let samples = samples()
        .into_iter()
        .map(|e| (variant_index(&e), PyErr::from(e).into_value(py).into_any()))
        .collect();
    (VARIANTS, samples)
}

/// Runs `work` with the GIL released, turning a panic into `EngineError` (a panic is a bug,
/// but it must not reach Python as `PanicException`, a `BaseException`).
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    // Every long call may need the compute threads, which a forked child lacks.
    crate::threads::check_not_forked()?;
    py.detach(|| catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|p| Err(Error::from_panic(p))))
        .map_err(PyErr::from)
}
