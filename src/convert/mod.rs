//! The conversion pipeline, one call from Python ([`convert`]): open the source once →
//! plan every tensor ([`plan`]: recipe, mixed precision, the user's predicate, the GGUF
//! precision floor) → quantize → write → validate ([`validate`]).
//!
//! [`convert_mlx`] writes the layout mlx-lm writes: `config.json` with `quantization` (and
//! its mirror `quantization_config`, plus per-module overrides), safetensors shards with
//! metadata `{"format": "mlx"}` named `model.safetensors` or
//! `model-00001-of-0000N.safetensors`, `model.safetensors.index.json`, tokenizer files.
//! [`gguf_out::convert_gguf`] writes one GGUF file instead. Both write where they are told;
//! making that atomic (a temporary sibling renamed at the end) is the caller's job.

pub mod gguf_out;
pub mod plan;
pub mod source;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::formats::safetensors::{self, Dtype, TensorSpec};
pub use crate::progress::Progress;
use crate::quant::{AffineMatrix, ScaleDType};
pub use plan::{make_plan, MixedPrecision, Plan, Policy, Predicate, QuantSpec, Recipe, Verdict};
pub use source::{Source, SourceTensor, TensorData};
pub use validate::Quality;

/// mlx-lm's largest shard.
pub const MAX_SHARD_BYTES: u64 = 5 << 30;

/// The file format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Mlx,
    Gguf,
}

impl OutputFormat {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mlx" => Ok(OutputFormat::Mlx),
            "gguf" => Ok(OutputFormat::Gguf),
            other => Err(Error::param(
                "output_format",
                format!("'{other}' is not one of mlx, gguf"),
            )),
        }
    }
}

/// Everything one conversion is asked to do besides where from and where to.
pub struct ConvertOptions {
    pub policy: Policy,
    pub output_format: OutputFormat,
    /// The format the caller expects the source to be in.
    pub source_format: ExpectedFormat,
    pub max_shard_bytes: u64,
    /// Load the output and measure it against the source ([`validate::validate`]).
    pub validate: bool,
}

/// What a conversion did, for `conversion.json`.
#[derive(Debug, Serialize)]
pub struct Conversion {
    /// `gguf`, `safetensors`, `mlx` or `pytorch`.
    pub source_format: &'static str,
    /// The model-wide bits (None: a float model).
    pub bits: Option<u32>,
    /// The distinct bits of the quantized modules, ascending.
    pub bits_used: Vec<u32>,
    pub bits_per_weight: f64,
    pub num_parameters: usize,
    pub per_tensor: BTreeMap<String, TensorReport>,
    /// Files written, relative to the output folder.
    pub files: Vec<String>,
    /// None when validation was not asked for.
    pub quality: Option<Quality>,
}

/// Converts the model at `source` into `out`: an existing empty directory for MLX output, a
/// file path for GGUF output. Progress counts tensors written; cancelling stops at the next
/// tensor (or validation step) with `Error::Cancelled`.
pub fn convert(
    source: &Path,
    out: &Path,
    options: &ConvertOptions,
    progress: &Progress,
) -> Result<Conversion> {
    crate::threads::init_thread_pool();
    let src = Source::open(source)?;
    check_source_format(options.source_format, &src)?;
    let plan = make_plan(
        &src.tensors,
        src.format,
        &src.config,
        &options.policy,
        src.float_dtype,
        options.max_shard_bytes,
    )?;
    if options.output_format == OutputFormat::Mlx && !out.is_dir() {
        // Said once the source and the plan are known good, before anything is converted
        // (not as a missing shard after every tensor was).
        return Err(Error::param(
            "out",
            format!(
                "MLX output goes into an existing directory; {} is not one",
                out.display()
            ),
        ));
    }
    let report = match options.output_format {
        OutputFormat::Mlx => convert_mlx(&src, &plan, out, progress)?,
        OutputFormat::Gguf => gguf_out::convert_gguf(&src, &plan, out, progress)?,
    };
    let source_format = src.format;
    // Validation loads the source as a model of its own: release this reader's maps first.
    drop(src);
    let quality = if options.validate {
        Some(validate::validate(out, source, progress)?)
    } else {
        None
    };
    let bits_used: BTreeSet<u32> = plan.modules.values().map(|s| s.bits).collect();
    Ok(Conversion {
        source_format,
        bits: plan.default.map(|s| s.bits),
        bits_used: bits_used.into_iter().collect(),
        bits_per_weight: report.bits_per_weight,
        num_parameters: report.num_parameters,
        per_tensor: report
            .tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect(),
        files: report.files,
        quality,
    })
}

/// The source format a caller asks for (`ConversionFormat` in Python, by value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedFormat {
    /// `huggingface`: whatever the files are (the format is detected).
    Any,
    /// An HF or MLX safetensors folder.
    Safetensors,
    Pytorch,
    Gguf,
}

impl ExpectedFormat {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "huggingface" => ExpectedFormat::Any,
            "safetensors" => ExpectedFormat::Safetensors,
            "pytorch" => ExpectedFormat::Pytorch,
            "gguf" => ExpectedFormat::Gguf,
            other => {
                return Err(Error::param(
                    "source_format",
                    format!("'{other}' is not one of huggingface, safetensors, pytorch, gguf"),
                ))
            }
        })
    }

    /// The detected formats ([`Source::format`]) it accepts; None: any.
    fn accepted(self) -> Option<&'static [&'static str]> {
        match self {
            ExpectedFormat::Any => None,
            ExpectedFormat::Safetensors => Some(&["safetensors", "mlx"]),
            ExpectedFormat::Pytorch => Some(&["pytorch"]),
            ExpectedFormat::Gguf => Some(&["gguf"]),
        }
    }
}

/// Refuses a source whose detected format is not the one the caller named.
fn check_source_format(expected: ExpectedFormat, src: &Source) -> Result<()> {
    match expected.accepted() {
        Some(accepted) if !accepted.contains(&src.format) => {
            crate::error::bail!(
                Conversion,
                "source_format is {} but {} holds a {} model",
                format!("{expected:?}").to_uppercase(),
                src.path.display(),
                src.format
            )
        }
        _ => Ok(()),
    }
}

/// What was written for one tensor, for `conversion.json`.
#[derive(Debug, Serialize)]
pub struct TensorReport {
    /// The key of `per_tensor`.
    #[serde(skip)]
    pub name: String,
    /// Logical shape (before packing).
    pub shape: Vec<usize>,
    /// How the source stored it (`Q4_1`, `BF16`, `affine4g64`...).
    pub source: String,
    /// None: kept float.
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    /// The quantized values are exactly the source's (a block-for-block transfer).
    pub lossless: bool,
    /// Root-mean-square error of the dequantized weight relative to the source's RMS.
    pub relative_rmse: Option<f64>,
}

/// What a writer wrote.
#[derive(Debug)]
pub struct Report {
    pub tensors: Vec<TensorReport>,
    pub files: Vec<String>,
    pub total_bytes: u64,
    pub num_parameters: usize,
    /// Bits of weight storage (packed values, scales, biases, float tensors) per parameter.
    pub bits_per_weight: f64,
}

fn scale_dtype(d: Dtype) -> ScaleDType {
    match d {
        Dtype::F16 => ScaleDType::F16,
        Dtype::BF16 => ScaleDType::BF16,
        _ => ScaleDType::F32,
    }
}

/// Root-mean-square error of `approx` against `exact`, relative to `exact`'s RMS (absolute
/// when `exact` is all zeros).
pub(crate) fn relative_rmse(exact: &[f32], approx: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (x, y) in exact.iter().zip(approx) {
        err += f64::from(x - y).powi(2);
        norm += f64::from(*x).powi(2);
    }
    if norm > 0.0 {
        (err / norm).sqrt()
    } else {
        err.sqrt()
    }
}

/// A tensor of shape `[lead.., cols]` as a matrix: `(product(lead), cols)`.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let cols = shape[shape.len() - 1];
    (shape.iter().product::<usize>() / cols.max(1), cols)
}

/// Quantizes (or transfers) one tensor according to the plan.
fn quantize(
    data: TensorData,
    t: &SourceTensor,
    spec: QuantSpec,
    dtype: ScaleDType,
) -> Result<(AffineMatrix, bool, f64)> {
    let (rows, cols) = rows_cols(&t.shape);
    let QuantSpec {
        bits,
        group_size: group,
    } = spec;
    match data {
        // Same bits and group, scales representable in the output dtype: a transfer.
        TensorData::Affine(a)
            if a.bits == bits
                && a.group_size == group
                && a.scales
                    .iter()
                    .chain(&a.biases)
                    .all(|&x| dtype.round(x) == x) =>
        {
            let a = AffineMatrix {
                scale_dtype: dtype,
                ..a
            };
            Ok((a, true, 0.0))
        }
        other => {
            let w = other.to_f32();
            let a = AffineMatrix::quantize(&w, rows, cols, bits, group, dtype)?;
            let rel = relative_rmse(&w, &a.dequantize());
            Ok((a, false, rel))
        }
    }
}

/// Writes the MLX layout of `source` under `plan` into `out` (an existing, empty
/// directory). Cancellation (`progress`) is checked between tensors.
pub fn convert_mlx(
    source: &Source,
    plan: &Plan,
    out: &Path,
    progress: &Progress,
) -> Result<Report> {
    let dtype = scale_dtype(plan.float_dtype);
    // Output tensors in name order; a quantized module contributes `.biases`, `.scales`
    // and `.weight`, which sort together in that order.
    let mut specs: Vec<(TensorSpec, usize)> = Vec::new(); // (spec, source index)
    for (i, t) in source.tensors.iter().enumerate() {
        let module = t.name.strip_suffix(".weight");
        match module.and_then(|m| plan.modules.get(m).map(|p| (m, *p))) {
            Some((
                m,
                QuantSpec {
                    bits,
                    group_size: group,
                },
            )) => {
                // Leading dims stay (stacked experts are `[experts, out, in]`); the last
                // one is packed.
                let (lead, cols) = (&t.shape[..t.shape.len() - 1], t.shape[t.shape.len() - 1]);
                let shape = |last: usize| [lead, &[last]].concat();
                let sd = plan.float_dtype;
                specs.push((
                    TensorSpec {
                        name: format!("{m}.biases"),
                        dtype: sd,
                        shape: shape(cols / group),
                    },
                    i,
                ));
                specs.push((
                    TensorSpec {
                        name: format!("{m}.scales"),
                        dtype: sd,
                        shape: shape(cols / group),
                    },
                    i,
                ));
                specs.push((
                    TensorSpec {
                        name: t.name.clone(),
                        dtype: Dtype::U32,
                        shape: shape(cols * bits as usize / 32),
                    },
                    i,
                ));
            }
            None => specs.push((
                TensorSpec {
                    name: t.name.clone(),
                    dtype: plan.float_dtype,
                    shape: t.shape.clone(),
                },
                i,
            )),
        }
    }
    specs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    // Shards: consecutive runs of at most `max_shard_bytes` (a single larger tensor gets
    // a shard of its own).
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (k, (spec, _)) in specs.iter().enumerate() {
        let current = shards.last_mut().expect("non-empty");
        if !current.is_empty() && size + spec.nbytes() > plan.max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(k);
        size += spec.nbytes();
    }
    let n = shards.len();
    let names: Vec<String> = (0..n)
        .map(|s| {
            if n == 1 {
                "model.safetensors".into()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", s + 1)
            }
        })
        .collect();
    progress.start(source.tensors.len());

    let mut reports: Vec<TensorReport> = Vec::new();
    let mut pending: HashMap<usize, AffineMatrix> = HashMap::new();
    let mut weight_map = serde_json::Map::new();
    let metadata = BTreeMap::from([("format".to_string(), "mlx".to_string())]);
    for (shard, file) in shards.iter().zip(&names) {
        let shard_specs: Vec<TensorSpec> = shard.iter().map(|&k| specs[k].0.clone()).collect();
        for s in &shard_specs {
            weight_map.insert(s.name.clone(), serde_json::Value::String(file.clone()));
        }
        safetensors::write(&out.join(file), &shard_specs, &metadata, |j| {
            progress.check_cancelled()?;
            let (out_spec, i) = &specs[shard[j]];
            let t = &source.tensors[*i];
            let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            match plan.modules.get(module) {
                None => {
                    let values = source.read(t)?.to_f32();
                    let lossless = values.iter().all(|&x| dtype.round(x) == x || x.is_nan());
                    reports.push(TensorReport {
                        name: t.name.clone(),
                        shape: t.shape.clone(),
                        source: t.stored.clone(),
                        bits: None,
                        group_size: None,
                        lossless,
                        relative_rmse: None,
                    });
                    progress.advance()?;
                    Ok(encode_float(&values, plan.float_dtype))
                }
                Some(&spec) => {
                    if !pending.contains_key(i) {
                        let (a, lossless, rel) = quantize(source.read(t)?, t, spec, dtype)?;
                        reports.push(TensorReport {
                            name: t.name.clone(),
                            shape: t.shape.clone(),
                            source: t.stored.clone(),
                            bits: Some(spec.bits),
                            group_size: Some(spec.group_size),
                            lossless,
                            relative_rmse: Some(rel),
                        });
                        pending.insert(*i, a);
                    }
                    let a = &pending[i];
                    let bytes = if out_spec.name.ends_with(".biases") {
                        dtype.encode(&a.biases)
                    } else if out_spec.name.ends_with(".scales") {
                        dtype.encode(&a.scales)
                    } else {
                        let bytes = a.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
                        pending.remove(i);
                        progress.advance()?;
                        bytes
                    };
                    Ok(bytes)
                }
            }
        })?;
    }
    let total_bytes: u64 = specs.iter().map(|(s, _)| s.nbytes()).sum();
    let num_parameters: usize = source
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    let index = serde_json::json!({
        "metadata": {"total_size": total_bytes, "total_parameters": num_parameters},
        "weight_map": weight_map,
    });
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    write_json(&out.join("config.json"), &output_config(source, plan))?;
    let mut files = names;
    files.extend(source.write_tokenizer_files(out)?);
    files.push("model.safetensors.index.json".into());
    files.push("config.json".into());
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Report {
        tensors: reports,
        files,
        total_bytes,
        num_parameters,
        bits_per_weight: total_bytes as f64 * 8.0 / num_parameters.max(1) as f64,
    })
}

/// The source's `config.json` with the quantization settings mlx-lm reads: the default
/// under `quantization` (mirrored as `quantization_config`), and an entry per module whose
/// bits or group size differ from it.
fn output_config(source: &Source, plan: &Plan) -> serde_json::Value {
    let mut config = source.config.clone();
    let map = config
        .as_object_mut()
        .expect("config.json is an object (checked at open)");
    map.remove("quantization");
    map.remove("quantization_config");
    map.insert(
        "torch_dtype".into(),
        source::torch_dtype_name(plan.float_dtype).into(),
    );
    if let Some(default) = plan.default {
        let mut q = serde_json::json!({
            "group_size": default.group_size, "bits": default.bits, "mode": "affine"
        });
        for (module, &spec) in &plan.modules {
            if spec != default {
                q[module] = serde_json::json!({"group_size": spec.group_size, "bits": spec.bits});
            }
        }
        map.insert("quantization".into(), q.clone());
        map.insert("quantization_config".into(), q);
    }
    config
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

fn encode_float(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => ScaleDType::F16.encode(values),
        Dtype::BF16 => ScaleDType::BF16.encode(values),
        _ => ScaleDType::F32.encode(values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_parsed_where_they_enter() -> Result<()> {
        assert_eq!(OutputFormat::parse("gguf")?, OutputFormat::Gguf);
        assert!(
            matches!(OutputFormat::parse("onnx"), Err(Error::InvalidParam { param, .. }) if param == "output_format")
        );
        assert_eq!(ExpectedFormat::parse("huggingface")?.accepted(), None);
        let safetensors = ExpectedFormat::parse("safetensors")?.accepted();
        assert_eq!(safetensors, Some(&["safetensors", "mlx"][..]));
        assert!(
            matches!(ExpectedFormat::parse("onnx"), Err(Error::InvalidParam { param, .. }) if param == "source_format")
        );
        Ok(())
    }

    #[test]
    fn relative_rmse_is_relative() {
        assert_eq!(relative_rmse(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        // Error (0, 5) against a norm of 5: 1.
        assert!((relative_rmse(&[3.0, 4.0], &[3.0, -1.0]) - 1.0).abs() < 1e-12);
        // All-zero reference: the absolute error.
        assert!((relative_rmse(&[0.0, 0.0], &[3.0, 4.0]) - 5.0).abs() < 1e-12);
    }
}
