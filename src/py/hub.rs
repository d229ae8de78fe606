//! `cortex._core.hub_snapshot_download` and `hub_cache_dir`: thin wrappers over
//! [`crate::hub`], raising the exception classes of `cortex.hub`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::model::PyProgress;
use crate::hub::{self, Error};

/// `cortex.hub.<class>(message)`, or `cortex.exceptions.<class>` for cancellation.
fn to_py(err: Error) -> PyErr {
    let class = match &err {
        Error::NotFound { .. } => "EntryNotFoundError",
        Error::NotCached(_) => "LocalEntryNotFoundError",
        Error::Checksum { .. } => "CacheError",
        Error::Denied { .. } | Error::Hub(_) | Error::Io { .. } => "HubError",
        Error::InvalidArgument { .. } => return PyValueError::new_err(err.to_string()),
        Error::Cancelled => "CancelledError",
    };
    let module = if class == "CancelledError" {
        "cortex.exceptions"
    } else {
        "cortex.hub"
    };
    Python::attach(|py| {
        match py
            .import(module)
            .and_then(|m| m.getattr(class))
            .and_then(|cls| cls.call1((err.to_string(),)))
        {
            Ok(e) => PyErr::from_value(e),
            Err(e) => e,
        }
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

/// The Hugging Face hub cache folder (``HF_HUB_CACHE``, ``HF_HOME/hub``, ...).
#[pyfunction]
pub fn hub_cache_dir() -> PathBuf {
    hub::cache_dir()
}
