//! `cortex._core.Server`: the OpenAI-compatible HTTP server ([`crate::server`]) over an
//! engine's requests. Python owns the waiting (in slices, so signals are handled there).

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::engine::{stats_dict, PyEngine};
use crate::server::{
    Server, ServerConfig, DEFAULT_MAX_QUEUE, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_WRITE_TIMEOUT,
};

#[pyclass(name = "Server", module = "cortex._core", frozen)]
pub struct PyServer {
    inner: Server,
}

#[pymethods]
impl PyServer {
    /// Binds `host:port` (0: a free port) and serves `engine`'s model as
    /// `served_model_name` until `shutdown`.
    #[new]
    #[pyo3(signature = (engine, *, served_model_name, host = "127.0.0.1".to_string(), port = 8000,
        api_key = None, max_queue = DEFAULT_MAX_QUEUE, chat_template = None,
        shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT.as_secs_f64(),
        write_timeout = DEFAULT_WRITE_TIMEOUT.as_secs_f64(), access_log = true,
        insecure = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: &PyEngine,
        served_model_name: String,
        host: String,
        port: u16,
        api_key: Option<String>,
        max_queue: usize,
        chat_template: Option<String>,
        shutdown_timeout: f64,
        write_timeout: f64,
        access_log: bool,
        insecure: bool,
    ) -> PyResult<Self> {
        let seconds = |name: &str, s: f64| {
            Duration::try_from_secs_f64(s).map_err(|_| {
                crate::Error::param(name, format!("{s} is not a number of seconds from 0 up"))
            })
        };
        let shutdown_timeout = seconds("shutdown_timeout", shutdown_timeout)?;
        let write_timeout = seconds("write_timeout", write_timeout)?;
        if write_timeout.is_zero() {
            return Err(crate::Error::param("write_timeout", "must be above 0 seconds").into());
        }
        if api_key.as_deref() == Some("") {
            return Err(crate::Error::param("api_key", "must not be empty").into());
        }
        let config = ServerConfig {
            host,
            port,
            api_key,
            served_model_name,
            max_queue,
            chat_template,
            shutdown_timeout,
            write_timeout,
            access_log,
            insecure,
        };
        let client = &engine.client;
        let inner = Server::start(client.engine().clone(), client.tokenizer().clone(), config)?;
        Ok(PyServer { inner })
    }

    /// The address listened on.
    #[getter]
    fn host(&self) -> String {
        self.inner.addr().ip().to_string()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.inner.addr().port()
    }

    /// Begins a graceful stop and returns at once (see `wait`).
    fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Waits up to `timeout` seconds (GIL released) for the server to have stopped.
    fn wait(&self, py: Python<'_>, timeout: f64) -> bool {
        let t = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        py.detach(|| self.inner.wait_within(t))
    }

    /// The engine's statistics (as `Engine.stats()`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.inner.engine())
    }
}

/// The server's defaults, as `cortex._core.DEFAULT_MAX_QUEUE`, `DEFAULT_SHUTDOWN_TIMEOUT`
/// and `DEFAULT_WRITE_TIMEOUT` (seconds).
pub fn add_defaults(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_MAX_QUEUE", DEFAULT_MAX_QUEUE)?;
    m.add(
        "DEFAULT_SHUTDOWN_TIMEOUT",
        DEFAULT_SHUTDOWN_TIMEOUT.as_secs_f64(),
    )?;
    m.add("DEFAULT_WRITE_TIMEOUT", DEFAULT_WRITE_TIMEOUT.as_secs_f64())?;
    Ok(())
}
