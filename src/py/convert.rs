//! The converter's bindings: source inspection (the Python side decides the per-tensor
//! plan, since recipes may carry Python predicates), a conversion job that runs on a Rust
//! thread and is polled with the GIL released, and the raw affine quantizer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::run_detached;
use crate::convert::gguf_out::convert_gguf;
use crate::convert::{convert_mlx, Plan, Progress, Source};
use crate::error::Error;
use crate::formats::safetensors::Dtype;
use crate::quant::{AffineMatrix, ScaleDType};

fn dtype_from(name: &str) -> Result<Dtype, Error> {
    match name {
        "float32" => Ok(Dtype::F32),
        "float16" => Ok(Dtype::F16),
        "bfloat16" => Ok(Dtype::BF16),
        other => Err(Error::param(
            "dtype",
            format!("'{other}' is not one of float32, float16, bfloat16"),
        )),
    }
}

/// Describes a conversion source: `{"format", "config", "float_dtype", "tensors": [(name,
/// shape, stored)]}` (JSON text).
#[pyfunction]
pub fn inspect_source(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    run_detached(py, move || {
        let s = Source::open(&path)?;
        let tensors: Vec<_> = s
            .tensors
            .iter()
            .map(|t| (&t.name, &t.shape, &t.stored))
            .collect();
        Ok(serde_json::json!({
            "format": s.format,
            "config": s.config,
            "model_type": s.model.model_type,
            "float_dtype": crate::convert::source::torch_dtype_name(s.float_dtype),
            "tensors": tensors,
        })
        .to_string())
    })
}

type Outcome = Option<Result<String, Error>>;

/// A conversion running on its own thread.
#[pyclass(name = "ConversionJob", module = "cortex._core", frozen)]
pub struct PyConversionJob {
    progress: Arc<Progress>,
    done: Arc<(Mutex<Outcome>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[pymethods]
impl PyConversionJob {
    /// Starts converting `source`: with `format="mlx"` into the existing empty directory
    /// `out`, with `format="gguf"` into the file `out`. `modules` maps module paths to
    /// `(bits, group_size)`; other tensors stay `float_dtype`.
    #[new]
    #[pyo3(signature = (source, out, *, default, modules, float_dtype, max_shard_bytes, format = "mlx"))]
    fn new(
        source: PathBuf,
        out: PathBuf,
        default: Option<(u32, usize)>,
        modules: BTreeMap<String, (u32, usize)>,
        float_dtype: &str,
        max_shard_bytes: u64,
        format: &str,
    ) -> PyResult<Self> {
        let gguf = match format {
            "mlx" => false,
            "gguf" => true,
            other => {
                return Err(Error::param(
                    "output_format",
                    format!("'{other}' is not one of mlx, gguf"),
                )
                .into())
            }
        };
        let plan = Plan {
            default,
            modules,
            float_dtype: dtype_from(float_dtype)?,
            max_shard_bytes,
        };
        let progress = Arc::new(Progress::default());
        let done: Arc<(Mutex<Outcome>, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
        let (p, d) = (progress.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("cortex-convert".into())
            .spawn(move || {
                let work = || -> crate::Result<String> {
                    crate::threads::init_thread_pool();
                    let src = Source::open(&source)?;
                    let report = if gguf {
                        convert_gguf(&src, &plan, &out, &p)?
                    } else {
                        convert_mlx(&src, &plan, &out, &p)?
                    };
                    serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                    .unwrap_or_else(|p| Err(Error::from_panic(p)));
                *d.0.lock() = Some(result);
                d.1.notify_all();
            })
            .map_err(|e| Error::Internal(format!("could not start the conversion thread: {e}")))?;
        Ok(PyConversionJob {
            progress,
            done,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits up to `timeout` seconds (GIL released); True once the job has ended.
    fn wait(&self, py: Python<'_>, timeout: f64) -> bool {
        let done = self.done.clone();
        py.detach(move || {
            let mut g = done.0.lock();
            if g.is_none() {
                done.1
                    .wait_for(&mut g, Duration::from_secs_f64(timeout.max(0.0)));
            }
            g.is_some()
        })
    }

    /// `(tensors done, tensors in all)`.
    fn progress(&self) -> (usize, usize) {
        self.progress.get()
    }

    /// Asks the job to stop at the next tensor; it then ends with `CancelledError`.
    fn cancel(&self) {
        self.progress.cancel();
    }

    /// The report (JSON text) of a finished job, or its error. Waits for the job.
    fn result(&self, py: Python<'_>) -> PyResult<String> {
        while !self.wait(py, 0.05) {
            py.check_signals()?;
        }
        if let Some(t) = self.thread.lock().take() {
            py.detach(|| t.join()).ok();
        }
        match self.done.0.lock().as_ref() {
            Some(Ok(report)) => Ok(report.clone()),
            Some(Err(e)) => Err(clone_error(e).into()),
            None => Err(Error::Internal("conversion ended without a result".into()).into()),
        }
    }
}

/// Errors are not `Clone` (they may hold `io::Error`s); rebuild one with the same class
/// and message.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::ModelNotFound { path, message } => Error::ModelNotFound {
            path: path.clone(),
            message: message.clone(),
        },
        Error::ModelFormat {
            path,
            offset,
            message,
        } => Error::ModelFormat {
            path: path.clone(),
            offset: *offset,
            message: message.clone(),
        },
        Error::UnsupportedArchitecture {
            architecture,
            supported,
        } => Error::UnsupportedArchitecture {
            architecture: architecture.clone(),
            supported: supported.clone(),
        },
        Error::Config { field, message } => Error::Config {
            field: field.clone(),
            message: message.clone(),
        },
        Error::Tokenizer(m) => Error::Tokenizer(m.clone()),
        Error::Template(m) => Error::Template(m.clone()),
        Error::InvalidParam { param, message } => Error::InvalidParam {
            param: param.clone(),
            message: message.clone(),
        },
        Error::ContextLength {
            prompt_tokens,
            context_length,
        } => Error::ContextLength {
            prompt_tokens: *prompt_tokens,
            context_length: *context_length,
        },
        Error::CacheFull { needed, capacity } => Error::CacheFull {
            needed: *needed,
            capacity: *capacity,
        },
        Error::Cancelled => Error::Cancelled,
        Error::Io { path, source } => Error::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        Error::Engine(m) => Error::Engine(m.clone()),
        Error::Conversion(m) => Error::Conversion(m.clone()),
        Error::Internal(m) => Error::Internal(m.clone()),
        Error::Candle(c) => Error::Internal(c.to_string()),
    }
}

/// MLX affine quantization of a row-major f32 matrix given as little-endian bytes:
/// returns `(packed uint32, scales, biases)` bytes, scales and biases in `dtype`.
#[pyfunction]
pub fn affine_quantize<'py>(
    py: Python<'py>,
    data: &[u8],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
    dtype: &str,
) -> PyResult<(
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
)> {
    let sd = match dtype_from(dtype)? {
        Dtype::F16 => ScaleDType::F16,
        Dtype::BF16 => ScaleDType::BF16,
        _ => ScaleDType::F32,
    };
    if data.len() != rows * cols * 4 {
        return Err(Error::param(
            "data",
            format!("{} bytes for [{rows}, {cols}] f32", data.len()),
        )
        .into());
    }
    let w: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let a = run_detached(py, move || {
        AffineMatrix::quantize(&w, rows, cols, bits, group_size, sd)
    })?;
    let packed: Vec<u8> = a.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
    Ok((
        PyBytes::new(py, &packed),
        PyBytes::new(py, &sd.encode(&a.scales)),
        PyBytes::new(py, &sd.encode(&a.biases)),
    ))
}
