//! `cortex._core.Model` and the loaders.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PySlice;

use super::run_detached;
use super::tokenizer::PyTokenizer;
use crate::engine::kv::KvDType;
use crate::engine::{Engine, SharedEngine, Speculative};
use crate::model::Model;
use crate::tokenizer::check_token_ids;

/// A loaded model: weights stay in their quantized form; safe to share across threads.
#[pyclass(name = "Model", module = "cortex._core", frozen)]
pub struct PyModel {
    pub(crate) inner: Arc<Model>,
    /// The engine `cortex.generate` and `cortex.stream_generate` share, started on first
    /// use, so threads generating with one model interleave in one batch.
    engine: SharedEngine,
}

impl PyModel {
    pub(crate) fn new(model: Model) -> Self {
        let inner = Arc::new(model);
        PyModel {
            engine: SharedEngine::new(inner.clone()),
            inner,
        }
    }

    /// The model's own engine with `speculative` decoding (see [`SharedEngine`]).
    pub(crate) fn engine(&self, speculative: Option<Speculative>) -> crate::Result<Arc<Engine>> {
        self.engine.get(speculative)
    }
}

#[pymethods]
impl PyModel {
    /// A copy of this model with every linear layer requantized to MLX affine groups:
    /// `bits` per weight, `head_bits` for the output head, groups of `group_size`.
    #[pyo3(signature = (bits, *, head_bits = None, group_size = 32))]
    fn requantize(
        &self,
        py: Python<'_>,
        bits: u32,
        head_bits: Option<u32>,
        group_size: usize,
    ) -> PyResult<PyModel> {
        let model = self.inner.clone();
        let head_bits = head_bits.unwrap_or(bits);
        let out = run_detached(py, move || model.requantized(bits, head_bits, group_size))?;
        Ok(PyModel::new(out))
    }

    /// A copy of this model whose linear layers compute in f32 from dequantized weights:
    /// a reference for the quantized kernels, which round activations to 8 bits per block
    /// of 32 (as llama.cpp's do). Takes 4 bytes per weight.
    fn dequantize(&self, py: Python<'_>) -> PyResult<PyModel> {
        let model = self.inner.clone();
        let out = run_detached(py, move || model.dequantized())?;
        Ok(PyModel::new(out))
    }

    /// Logits for several sequences run side by side in one batched forward pass, each
    /// from an empty context (what the engine does with concurrent requests).
    ///
    /// Args:
    ///     token_ids: the input tokens of each sequence.
    ///     all_positions: return logits for every position, not only the last.
    ///
    /// Returns:
    ///     list[numpy.ndarray]: per sequence, float32 `[len(token_ids[i]), vocab]` with
    ///     `all_positions`, else `[vocab]`.
    #[pyo3(signature = (token_ids, *, all_positions = false))]
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<Vec<i64>>,
        all_positions: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let vocab = self.inner.config.vocab_size;
        let seqs = token_ids
            .iter()
            .map(|ids| check_token_ids(ids, vocab, "token_ids"))
            .collect::<Result<Vec<_>, _>>()?;
        let model = self.inner.clone();
        let (values, _) = run_detached(py, move || {
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            model.forward_batch(&refs, all_positions)
        })?;
        // One array owns the logits; each sequence gets a view of its rows.
        let total = values.len() / vocab;
        let all = PyArray1::from_vec(py, values).reshape([total, vocab])?;
        let mut at = 0;
        token_ids
            .iter()
            .map(|ids| {
                let rows = if all_positions { ids.len() } else { 1 };
                let view = if all_positions {
                    all.get_item(PySlice::new(py, at as isize, (at + rows) as isize, 1))
                } else {
                    all.get_item(at)
                };
                at += rows;
                view
            })
            .collect()
    }

    /// Logits for `token_ids` from an empty context.
    ///
    /// Args:
    ///     token_ids: the input tokens.
    ///     all_positions: return logits for every position, not only the last.
    ///
    /// Returns:
    ///     numpy.ndarray: float32, `[vocab]` or `[len(token_ids), vocab]`.
    #[pyo3(signature = (token_ids, *, all_positions = false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        token_ids: Vec<i64>,
        all_positions: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vocab = self.inner.config.vocab_size;
        let ids = check_token_ids(&token_ids, vocab, "token_ids")?;
        let model = self.inner.clone();
        let (values, rows) = run_detached(py, move || model.forward(&ids, all_positions))?;
        // The array takes the Vec as its buffer: no copy on the way to Python.
        let array = PyArray1::from_vec(py, values);
        Ok(if all_positions {
            array.reshape([rows, vocab])?.into_any()
        } else {
            array.into_any()
        })
    }

    /// The decoder configuration (Hugging Face field names).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(&self.inner.config)
            .map_err(|e| crate::Error::Internal(e.to_string()))?;
        py.import("json")?.call_method1("loads", (json,))
    }

    #[getter]
    fn num_parameters(&self) -> usize {
        self.inner.num_parameters
    }

    /// Bytes the weights occupy in memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    /// Bytes of keys and values one cached position takes, over all layers (f16 for
    /// quantized models, f32 for float ones).
    #[getter]
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.decoder().kv_bytes_per_token()
    }

    /// Whether the linear layers hold quantized blocks (GGUF quantized types, MLX affine
    /// groups, a `requantize` copy) rather than floats; a quantized model's KV cache is
    /// f16.
    #[getter]
    fn quantized(&self) -> bool {
        self.inner.decoder().quantized()
    }

    /// How the KV cache stores keys and values: `"float16"` or `"float32"`.
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        match self.inner.decoder().kv_dtype() {
            KvDType::F16 => "float16",
            KvDType::BF16 => "bfloat16",
            KvDType::F32 => "float32",
        }
    }

    /// `"cpu"` or `"cuda:N"`.
    #[getter]
    fn device(&self) -> String {
        self.inner.device()
    }

    // Python properties: methods of the instance even where the value is fixed today.

    /// Activation dtype; weights keep their stored (quantized) types.
    #[allow(clippy::unused_self)]
    #[getter]
    fn dtype(&self) -> &'static str {
        "float32"
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    fn __repr__(&self) -> String {
        let c = &self.inner.config;
        format!(
            "Model(model_type={:?}, layers={}, hidden_size={}, vocab_size={}, parameters={}, path={:?})",
            c.model_type.name(), c.num_hidden_layers, c.hidden_size, c.vocab_size, self.inner.num_parameters, self.inner.path.display().to_string()
        )
    }
}

/// How far a long step has got, shared with the thread running it: `load` counts layers
/// built, `convert` tensors written. The step stops with `CancelledError` at its next unit
/// once `cancel` is called.
#[pyclass(name = "Progress", module = "cortex._core", frozen)]
pub struct PyProgress {
    pub(crate) inner: Arc<crate::progress::Progress>,
}

#[pymethods]
impl PyProgress {
    #[new]
    fn new() -> Self {
        PyProgress {
            inner: Arc::default(),
        }
    }

    /// `(done, total)`; total is 0 until the step has started.
    fn get(&self) -> (usize, usize) {
        self.inner.get()
    }

    fn cancel(&self) {
        self.inner.cancel();
    }
}

/// Loads model and tokenizer from a `.gguf` file or a directory holding one.
#[pyfunction]
#[pyo3(signature = (path, progress = None, device = "cpu"))]
pub fn load(
    py: Python<'_>,
    path: PathBuf,
    progress: Option<&PyProgress>,
    device: &str,
) -> PyResult<(PyModel, PyTokenizer)> {
    let progress = progress.map_or_else(Default::default, |p| p.inner.clone());
    let device = device.to_owned();
    let (model, tokenizer) = run_detached(py, move || {
        let (model, tokenizer) = crate::model::load_with(&path, &progress)?;
        Ok((model.to_device(&device)?, tokenizer))
    })?;
    Ok((
        PyModel::new(model),
        PyTokenizer {
            inner: Arc::new(tokenizer),
        },
    ))
}

/// Loads only the model weights.
#[pyfunction]
#[pyo3(signature = (path, progress = None, device = "cpu"))]
pub fn load_model(
    py: Python<'_>,
    path: PathBuf,
    progress: Option<&PyProgress>,
    device: &str,
) -> PyResult<PyModel> {
    let progress = progress.map_or_else(Default::default, |p| p.inner.clone());
    let device = device.to_owned();
    let model = run_detached(py, move || {
        crate::model::load_model_with(&path, &progress)?.to_device(&device)
    })?;
    Ok(PyModel::new(model))
}

/// Loads only the tokenizer (from `tokenizer.json` in a model folder, else GGUF metadata).
#[pyfunction]
pub fn load_tokenizer(py: Python<'_>, path: PathBuf) -> PyResult<PyTokenizer> {
    let tokenizer = run_detached(py, move || crate::model::load_tokenizer(&path))?;
    Ok(PyTokenizer {
        inner: Arc::new(tokenizer),
    })
}

/// Whether this build has the CUDA backend.
#[pyfunction]
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// CUDA GPUs this process can use (0 without the CUDA backend, a driver or a GPU).
#[pyfunction]
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    return crate::cuda::device_count();
    #[cfg(not(feature = "cuda"))]
    0
}

/// GPU `ordinal`'s name, total and free memory (bytes), compute capability and driver
/// CUDA version, as a dict.
#[pyfunction]
pub fn cuda_info(py: Python<'_>, ordinal: usize) -> PyResult<Py<pyo3::types::PyDict>> {
    #[cfg(feature = "cuda")]
    {
        let info = crate::cuda::Gpu::open(ordinal)?.info()?;
        let d = pyo3::types::PyDict::new(py);
        d.set_item("name", info.name)?;
        d.set_item("total_memory", info.total_memory)?;
        d.set_item("free_memory", info.free_memory)?;
        d.set_item("compute_capability", info.compute_capability)?;
        d.set_item("driver_version", info.driver_version)?;
        Ok(d.unbind())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (py, ordinal);
        Err(crate::Error::param("device", "this build of Cortex has no CUDA support").into())
    }
}

/// Where forward passes' time went, per operation: `(operation, calls, seconds)`, while
/// profiling is on (see `crate::model::profile`; on the GPU each operation is then
/// synchronised and decode steps run op by op rather than as CUDA graphs). `reset` starts
/// a fresh profile; `enable` turns profiling on or off from then on (`CORTEX_PROFILE=1`
/// turns it on from the start).
#[pyfunction]
#[pyo3(signature = (reset = false, enable = None))]
pub fn profile(reset: bool, enable: Option<bool>) -> Vec<(&'static str, u64, f64)> {
    let rows = crate::model::profile::profile(reset);
    if let Some(on) = enable {
        crate::model::profile::set_profiling(on);
    }
    rows
}

/// The instruction set the quantized kernels run with: `amx`, `avx512vnni`, `avx2` or
/// `scalar`.
#[pyfunction]
pub fn kernel_isa() -> &'static str {
    crate::quant::Isa::active().name()
}

/// Activation rows from which a quantized product runs on AMX (where it is in use).
#[pyfunction]
pub fn amx_min_rows() -> usize {
    crate::quant::kernels::AMX_MIN_ROWS
}

/// Whether this process may run AMX: the CPU lists it, the OS grants it, and a trial
/// product in a child process came out right (decided at the first call).
#[pyfunction]
pub fn amx_available() -> bool {
    crate::quant::Isa::available().contains(&crate::quant::Isa::Amx)
}

/// Allows or forbids AMX for every model of this process; returns the previous setting.
#[pyfunction]
pub fn allow_amx(allowed: bool) -> bool {
    crate::quant::Isa::allow_amx(allowed)
}

/// Times one of the engine's kernels (see `crate::bench::time_operation`): returns the
/// total seconds of `iterations` runs, and the FLOPs and bytes read of one.
#[pyfunction]
pub fn time_operation(
    py: Python<'_>,
    operation: String,
    shape: Vec<usize>,
    iterations: usize,
) -> PyResult<(f64, f64, f64)> {
    run_detached(py, move || {
        let t = crate::bench::time_operation(&operation, &shape, iterations)?;
        Ok((t.seconds, t.flops, t.bytes))
    })
}
