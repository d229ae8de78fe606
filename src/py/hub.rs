//! `cortex._core.hub_snapshot_download` and `hub_cache_dir`: thin wrappers over
//! [`crate::hub`], raising the exception classes of `cortex.hub`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::model::PyProgress;
use crate::hub::{self, Error};

/// The module and class an error is raised as.
fn class_of(err: &Error) -> Option<(&'static str, &'static str)> {
    Some(match err {
        Error::NotFound { .. } => ("cortex.hub", "EntryNotFoundError"),
        Error::NotCached(_) => ("cortex.hub", "LocalEntryNotFoundError"),
        Error::Checksum { .. } => ("cortex.hub", "CacheError"),
        Error::Denied { .. } | Error::Gated { .. } | Error::Hub(_) | Error::Io { .. } => {
            ("cortex.hub", "HubError")
        }
        // The Hub's error decides the class; the cache miss becomes its `__cause__`.
        Error::NoFallback { error, .. } => return class_of(error),
        Error::InvalidArgument { .. } => return None,
        Error::Cancelled => ("cortex.exceptions", "CancelledError"),
    })
}

fn instance(py: Python<'_>, module: &str, class: &str, message: String) -> PyErr {
    match py
        .import(module)
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message,)))
    {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

/// `cortex.hub.<class>(message)`, or `cortex.exceptions.<class>` for cancellation, or
/// `ValueError` for an invalid argument.
fn to_py(err: Error) -> PyErr {
    let Some((module, class)) = class_of(&err) else {
        return PyValueError::new_err(err.to_string());
    };
    Python::attach(|py| {
        let e = instance(py, module, class, err.to_string());
        if let Error::NoFallback { cache, .. } = &err {
            let miss = instance(py, "cortex.hub", "LocalEntryNotFoundError", cache.clone());
            e.set_cause(py, Some(miss));
        }
        e
    })
}

/// Fetches what a model needs from a Hub repo into the Hugging Face cache and returns the
/// snapshot folder.
///
/// Args:
///     repo_id: ``org/name``.
///     revision: a branch, tag or commit.
///     filename: the weights file to take (one GGUF among several).
///     allow_patterns: fetch exactly the files matching these fnmatch patterns.
///     ignore_patterns: never fetch files matching these.
///     progress: counts MiB downloaded; cancelling it stops the download.
///
/// Returns:
///     The snapshot folder.
#[pyfunction]
#[pyo3(signature = (repo_id, revision, filename = None, allow_patterns = None, ignore_patterns = None, progress = None))]
pub fn hub_snapshot_download(
    py: Python<'_>,
    repo_id: String,
    revision: String,
    filename: Option<String>,
    allow_patterns: Option<Vec<String>>,
    ignore_patterns: Option<Vec<String>>,
    progress: Option<&PyProgress>,
) -> PyResult<PathBuf> {
    let progress = progress.map_or_else(Arc::default, |p| p.inner.clone());
    let request = hub::Request {
        repo_id,
        revision,
        filename,
        allow_patterns,
        ignore_patterns,
    };
    // A panic is a bug, but it must not reach Python as `PanicException` (a BaseException).
    py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| {
            hub::snapshot_download(&request, &progress)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Hub(
                "internal error (a bug): the download panicked".into(),
            ))
        })
    })
    .map_err(to_py)
}

/// The Hugging Face hub cache folder: ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``,
/// ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``.
#[pyfunction]
pub fn hub_cache_dir() -> PathBuf {
    hub::cache_dir()
}
