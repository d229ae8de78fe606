//! GGUF output: one file that llama.cpp and the `gguf` Python package read (architecture
//! name, hyper-parameter keys and tensor names from the family's adapter), with the
//! tokenizer and chat template in its metadata.
//!
//! Bits → GGML block type (all with a per-block scale, llama.cpp's own quantizers for the
//! k-quants through candle):
//!
//! | bits | type | when rows do not split into 256-wide super-blocks |
//! |------|------|------|
//! | 8 | Q8_0 | — |
//! | 6 | Q6_K | Q8_0 |
//! | 5 | Q5_1 (exact transfer from MLX 5-bit g32 with f16 scales) | — |
//! | 4 | Q4_1 (exact transfer from MLX 4-bit g32 with f16 scales) | — |
//! | 3 | Q3_K | Q4_1 |
//! | 2 | Q2_K | Q4_1 |
//!
//! Float tensors: 1-D (norms) as F32, matrices as F16 (F32 when the plan's float type is
//! F32). A GGUF source keeps its blocks where the target type is the stored type.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::source::{llama_cpp_layout, Source, TensorData};
use super::{relative_rmse, Plan, Progress, Report, TensorReport};
use crate::error::{Error, Result};
use crate::formats::gguf::{write_gguf, GgufTensorSpec};
use crate::formats::safetensors::Dtype;
use crate::model::weights::split_param;
use crate::quant::ggml;

/// The block type for `bits` on rows of `cols` values.
pub fn ggml_type_for(bits: u32, cols: usize) -> GgmlDType {
    let k_ok = cols.is_multiple_of(256);
    match bits {
        6 if k_ok => GgmlDType::Q6K,
        6 | 8 => GgmlDType::Q8_0,
        5 => GgmlDType::Q5_1,
        3 if k_ok => GgmlDType::Q3K,
        2 if k_ok => GgmlDType::Q2K,
        _ => GgmlDType::Q4_1,
    }
}

fn u32s(v: impl IntoIterator<Item = u32>) -> Value {
    Value::Array(v.into_iter().map(Value::U32).collect())
}

/// Model hyper-parameters under llama.cpp's `{arch}.*` keys.
fn model_metadata(source: &Source, name: &str) -> Vec<(String, Value)> {
    let c = &source.model;
    let traits = c.model_type.traits();
    let arch = traits.gguf_arch;
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.to_string()),
        ),
        ("general.name".into(), Value::String(name.to_string())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (k("attention.key_length"), Value::U32(c.head_dim as u32)),
        (k("attention.value_length"), Value::U32(c.head_dim as u32)),
        (
            k(if traits.layer_norm {
                "attention.layer_norm_epsilon"
            } else {
                "attention.layer_norm_rms_epsilon"
            }),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta)),
        (k("rope.dimension_count"), Value::U32(c.rotary_dim as u32)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
    ];
    // llama.cpp reads a window only where its graph has one.
    if let Some(w) = c
        .sliding_window
        .filter(|_| c.sliding_window_pattern.is_some())
    {
        m.push((k("attention.sliding_window"), Value::U32(w as u32)));
    }
    if let Some(crate::model::config::RopeScaling::Linear { factor }) = c.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor)));
    }
    m
}

/// Tokenizer metadata: copied from a GGUF source, or built from a byte-level BPE
/// `tokenizer.json` (llama.cpp's `gpt2` tokenizer model).
fn tokenizer_metadata(source: &Source) -> Result<Vec<(String, Value)>> {
    if let Some(g) = source.gguf_file() {
        let mut keys: Vec<&String> = g
            .metadata
            .keys()
            .filter(|k| k.starts_with("tokenizer."))
            .collect();
        keys.sort();
        return Ok(keys
            .into_iter()
            .map(|k| (k.clone(), g.metadata[k].clone()))
            .collect());
    }
    let path = source.path.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::Tokenizer(format!(
            "GGUF output needs the tokenizer, and {} has no tokenizer.json",
            source.path.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("{}: invalid JSON: {e}", path.display())))?;
    let model = &json["model"];
    let byte_level = text.contains("\"ByteLevel\"");
    if model["type"] != "BPE" || !byte_level || model["byte_fallback"] == true {
        return Err(Error::Tokenizer(format!(
            "GGUF output supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen); {} is not one",
            path.display()
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::Tokenizer("tokenizer.json has no model.vocab".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; source.model.vocab_size];
    let mut types = vec![1i32; source.model.vocab_size]; // 1 = normal
    let mut place = |id: u64, tok: &str, ty: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(tok.to_string());
            types[id as usize] = ty;
        }
    };
    for (tok, id) in vocab {
        place(id.as_u64().unwrap_or(u64::MAX), tok, 1);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        // 3 = control (special), 4 = user-defined.
        place(id, content, if added["special"] == true { 3 } else { 4 });
    }
    // Ids past the tokenizer's vocabulary (padding rows of the embedding) get placeholders.
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let tok = crate::tokenizer::Tokenizer::from_dir(&source.path)?;
    if let Some(bos) = tok.bos_token_id {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = tok.eos_token_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if tok.eos_token_ids.len() > 1 {
        m.push((
            "tokenizer.ggml.eos_token_ids".into(),
            u32s(tok.eos_token_ids.iter().copied()),
        ));
    }
    let config_path = source.path.join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&config_path) {
        if let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(t) = cfg["chat_template"].as_str() {
                m.push((
                    "tokenizer.chat_template".into(),
                    Value::String(t.to_string()),
                ));
            }
            if let Some(b) = cfg["add_bos_token"].as_bool() {
                m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
            }
        }
    }
    Ok(m)
}

/// Writes `source` under `plan` as one GGUF file at `out`.
pub fn convert_gguf(
    source: &Source,
    plan: &Plan,
    out: &Path,
    progress: &Progress,
) -> Result<Report> {
    use crate::model::config::RopeScaling;
    if matches!(
        source.model.rope_scaling,
        Some(RopeScaling::Llama3Params { .. } | RopeScaling::Yarn { .. })
    ) {
        return Err(Error::config(
            "rope_scaling",
            "GGUF output of llama 3 and YaRN rope scaling is not supported yet; use MLX output",
        ));
    }
    let family = source.model.model_type;
    let mut specs = Vec::new();
    for t in &source.tensors {
        let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        let name = source.gguf_name(t).ok_or_else(|| {
            Error::format(
                &source.path,
                None,
                format!("tensor '{}' has no GGUF name for {family}", t.name),
            )
        })?;
        let dtype = match (plan.modules.get(module), t.shape.len()) {
            (Some(spec), 2) => ggml_type_for(spec.bits, t.shape[1]),
            (_, 1) => GgmlDType::F32,
            _ if plan.float_dtype == Dtype::F32 => GgmlDType::F32,
            _ => GgmlDType::F16,
        };
        specs.push(GgufTensorSpec {
            name,
            dims: t.shape.clone(),
            dtype,
        });
    }
    let name = source
        .path
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    let mut metadata = model_metadata(source, &name);
    metadata.extend(tokenizer_metadata(source)?);
    progress.start(specs.len());
    let mut reports = Vec::new();
    write_gguf(out, &metadata, &specs, |i| {
        progress.check_cancelled()?;
        let (t, spec) = (&source.tensors[i], &specs[i]);
        let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        let planned = plan.modules.get(module).copied();
        let mut report = TensorReport {
            name: t.name.clone(),
            shape: t.shape.clone(),
            source: t.stored.clone(),
            bits: planned.map(|p| p.bits),
            group_size: planned.map(|p| p.group_size),
            lossless: false,
            relative_rmse: None,
        };
        // A GGUF source already stores this type: copy its blocks.
        if let Some(q) = source.gguf_tensor(t)?.filter(|q| q.dtype() == spec.dtype) {
            report.lossless = true;
            reports.push(report);
            progress.advance()?;
            return Ok(q.data()?.into_owned());
        }
        let module = split_param(&t.name).map_or(t.name.as_str(), |(m, _)| m);
        let data = llama_cpp_layout(source.read(t)?, module, &t.shape, &source.model, false);
        let bytes = match (&data, spec.dtype) {
            (TensorData::Affine(a), GgmlDType::Q4_1 | GgmlDType::Q5_1) => {
                match ggml::from_affine(a) {
                    Some((ty, bytes)) if ty == spec.dtype => {
                        report.lossless = true;
                        Some(bytes)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let bytes = if let Some(b) = bytes {
            b
        } else {
            let values = data.to_f32();
            let tensor = Tensor::from_vec(values.clone(), spec.dims.clone(), &Device::Cpu)?;
            let q = QTensor::quantize(&tensor, spec.dtype)?;
            if spec.dtype == GgmlDType::F32 {
                report.lossless = true;
            } else {
                let back = q
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let rel = relative_rmse(&values, &back);
                report.relative_rmse = Some(rel);
                report.lossless = rel == 0.0;
            }
            q.data()?.into_owned()
        };
        reports.push(report);
        progress.advance()?;
        Ok(bytes)
    })?;
    let total_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let num_parameters: usize = source
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    Ok(Report {
        tensors: reports,
        files: vec![out
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())],
        total_bytes,
        num_parameters,
        bits_per_weight: total_bytes as f64 * 8.0 / num_parameters.max(1) as f64,
    })
}
