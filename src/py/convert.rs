//! The converter's bindings: one call per conversion ([`convert`], the core's
//! [`crate::convert::convert`] with the GIL released, reporting to the same `Progress` a
//! load reports to), the user's predicate called back into Python from the Rust plan, the
//! supported bits and group sizes, and the raw affine quantizer.

use std::path::PathBuf;
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyTuple};

use super::model::PyProgress;
use super::run_detached;
use crate::convert::{
    ConvertOptions, ExpectedFormat, MixedPrecision, OutputFormat, Policy, Predicate, Recipe,
    Verdict,
};
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

/// A Python callable `(path, shape, config) -> bool | dict` as the plan's [`Predicate`].
struct PyPredicate {
    func: Py<PyAny>,
    /// The source's `config.json` as a Python dict, built on the first call.
    config: OnceLock<Py<PyAny>>,
}

/// The parameter a failing predicate is reported under.
const PREDICATE: &str = "mixed_precision_config['predicate']";

impl Predicate for PyPredicate {
    fn decide(
        &self,
        module: &str,
        shape: &[usize],
        config: &serde_json::Value,
    ) -> crate::Result<Verdict> {
        Python::attach(|py| {
            let config = if let Some(c) = self.config.get() {
                c.clone_ref(py)
            } else {
                let c = json_to_py(py, config)?.unbind();
                self.config.get_or_init(|| c).clone_ref(py)
            };
            let shape = PyTuple::new(py, shape)?;
            let verdict = self.func.call1(py, (module, shape, config))?;
            verdict_from(verdict.bind(py))
        })
        .map_err(|e: PyErr| Error::param(PREDICATE, format!("for '{module}': {e}")))
    }
}

/// `True`/`False` (any truthy value), or a dict with optional `bits` and `group_size`.
fn verdict_from(v: &Bound<'_, PyAny>) -> PyResult<Verdict> {
    if let Ok(d) = v.cast::<PyDict>() {
        let get = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> { d.get_item(key) };
        return Ok(Verdict::With {
            bits: get("bits")?.map(|b| b.extract()).transpose()?,
            group_size: get("group_size")?.map(|g| g.extract()).transpose()?,
        });
    }
    Ok(if v.is_truthy()? {
        Verdict::Quantize
    } else {
        Verdict::Skip
    })
}

/// A JSON value as the Python object `json.loads` would give.
fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let items = items
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(map) => {
            let d = PyDict::new(py);
            for (k, x) in map {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// Adds `SUPPORTED_BITS` and `SUPPORTED_GROUP_SIZES` (tuples of the affine settings the
/// converter and the loader accept) to the module.
pub fn add_constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use crate::quant::affine::{SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
    m.add("SUPPORTED_BITS", PyTuple::new(m.py(), SUPPORTED_BITS)?)?;
    m.add(
        "SUPPORTED_GROUP_SIZES",
        PyTuple::new(m.py(), SUPPORTED_GROUP_SIZES)?,
    )
}

/// Converts a model in one call, on the calling thread with the GIL released (the
/// predicate takes it back while it runs).
///
/// Args:
///     source: a model folder (HF, MLX, PyTorch) or a `.gguf` file.
///     out: an existing empty directory (`output_format="mlx"`) or the file to write
///         (`"gguf"`).
///     quantization: a `QuantizationRecipe` value: `4bit`, `5bit`, `8bit`, `mixed`, `none`.
///     group_size: one of `SUPPORTED_GROUP_SIZES`.
///     critical_layers, critical_bits, standard_bits: the mixed recipe's rule (defaults:
///         lm_head/embed_tokens/wte/wpe, 6, 4).
///     predicate: `(path, shape, config) -> bool | {"bits", "group_size"}`, called once
///         per candidate matrix.
///     bits_override: bits for every quantized matrix (one of `SUPPORTED_BITS`).
///     source_format: a `ConversionFormat` value the source must be in.
///     max_shard_bytes: the largest safetensors shard (default 5 GiB, as mlx-lm).
///     validate: load the output and measure it against the source.
///     progress: reports tensors written; `cancel()` stops the conversion.
///
/// Returns:
///     dict: `source_format`, `bits`, `bits_used`, `bits_per_weight`, `num_parameters`,
///     `per_tensor` (name → `source`, `bits`, `group_size`, `lossless`, `relative_rmse`),
///     `files` and `quality` (None without validation).
#[pyfunction]
#[pyo3(signature = (
    source, out, *, quantization = "4bit", group_size = 64, critical_layers = None,
    critical_bits = None, standard_bits = None, predicate = None, bits_override = None,
    output_format = "mlx", source_format = "huggingface",
    max_shard_bytes = None, validate = true, progress = None
))]
#[allow(clippy::too_many_arguments)]
pub fn convert<'py>(
    py: Python<'py>,
    source: PathBuf,
    out: PathBuf,
    quantization: &str,
    group_size: usize,
    critical_layers: Option<Vec<String>>,
    critical_bits: Option<u32>,
    standard_bits: Option<u32>,
    predicate: Option<Py<PyAny>>,
    bits_override: Option<u32>,
    output_format: &str,
    source_format: &str,
    max_shard_bytes: Option<u64>,
    validate: bool,
    progress: Option<&PyProgress>,
) -> PyResult<Bound<'py, PyAny>> {
    let defaults = MixedPrecision::default();
    let mixed = MixedPrecision {
        critical_layers: critical_layers.unwrap_or(defaults.critical_layers),
        critical_bits: critical_bits.unwrap_or(defaults.critical_bits),
        standard_bits: standard_bits.unwrap_or(defaults.standard_bits),
    };
    let predicate = predicate.map(|func| -> Box<dyn Predicate> {
        Box::new(PyPredicate {
            func,
            config: OnceLock::new(),
        })
    });
    let options = ConvertOptions {
        policy: Policy::new(
            Recipe::parse(quantization)?,
            group_size,
            mixed,
            bits_override,
            predicate,
        )?,
        output_format: OutputFormat::parse(output_format)?,
        source_format: ExpectedFormat::parse(source_format)?,
        max_shard_bytes: max_shard_bytes.unwrap_or(crate::convert::MAX_SHARD_BYTES),
        validate,
    };
    let progress = progress.map_or_else(Default::default, |p| p.inner.clone());
    let done = run_detached(py, move || {
        crate::convert::convert(&source, &out, &options, &progress)
    })?;
    let json = serde_json::to_value(&done).map_err(|e| Error::Internal(e.to_string()))?;
    json_to_py(py, &json)
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
