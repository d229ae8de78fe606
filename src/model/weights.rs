//! Where a model's weights come from, addressed by Hugging Face module paths
//! (`model.layers.0.self_attn.q_proj`) whatever the file format:
//!
//! * [`GgufWeights`]: a GGUF file; names map onto llama.cpp's (`blk.0.attn_q`), GGML blocks
//!   stay as they are.
//! * [`FolderWeights`]: a folder of safetensors (one file, or shards with
//!   `model.safetensors.index.json`) in HF layout — dense f32/f16/bf16 — or in MLX layout,
//!   where a quantized module `P` stores `P.weight` (packed uint32), `P.scales` and
//!   `P.biases`, with bits and group size from `config.json`'s `quantization` (per-module
//!   overrides keyed by module path).
//!
//! Every tensor's shape is checked against what the configuration expects before its data
//! is read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::{Dtype, SafetensorsFile};
use crate::model::layers::{dense, Weight};
use crate::quant::affine::{transpose, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
use crate::quant::{AffineMatrix, ScaleDType};

/// llama.cpp's tensor name for an HF module path (without `.weight`), `None` when the
/// module has no GGUF counterpart. `family` decides the one name that differs: the
/// llama family's pre-MLP norm is HF `post_attention_layernorm`, Gemma's is
/// `pre_feedforward_layernorm` and its `post_attention_layernorm` is a sandwich norm.
pub fn gguf_name(module: &str, family: &str) -> Option<String> {
    // phi-2 and GPT-2 have plain MLPs (`fc1`, `fc2`) where the others have gated ones.
    let plain = matches!(family, "phi2" | "gpt2");
    match module {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.embed_positions" if family == "gpt2" => return Some("position_embd".into()),
        "model.norm" if family != "phi2" => return Some("output_norm".into()),
        "model.final_layernorm" if family == "phi2" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gemma = family == "gemma3";
    let name = match leaf {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" if family != "phi2" => "attn_output",
        "self_attn.dense" if family == "phi2" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        // Phi 3's fused projections (llama.cpp keeps gate and up fused under `ffn_up`).
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" if family == "phi3" => "ffn_up",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "mlp.gate_proj" if !plain => "ffn_gate",
        "mlp.up_proj" if !plain => "ffn_up",
        "mlp.down_proj" if !plain => "ffn_down",
        // Qwen 3 MoE: the router, and every expert's projection stacked in one tensor.
        "mlp.gate" => "ffn_gate_inp",
        "mlp.switch_mlp.gate_proj" => "ffn_gate_exps",
        "mlp.switch_mlp.up_proj" => "ffn_up_exps",
        "mlp.switch_mlp.down_proj" => "ffn_down_exps",
        "mlp.fc1" if plain => "ffn_up",
        "mlp.fc2" if plain => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}"))
}

/// Splits a parameter name into its module path and `weight` / `bias`.
pub fn split_param(name: &str) -> Option<(&str, &str)> {
    name.strip_suffix(".weight")
        .map(|m| (m, "weight"))
        .or_else(|| name.strip_suffix(".bias").map(|m| (m, "bias")))
}

/// llama.cpp's name for an HF parameter (`model.layers.0.self_attn.q_proj.bias` →
/// `blk.0.attn_q.bias`).
pub fn gguf_param(name: &str, family: &str) -> Option<String> {
    let (module, suffix) = split_param(name)?;
    Some(format!("{}.{suffix}", gguf_name(module, family)?))
}

/// The HF name of a GGUF parameter (the inverse of [`gguf_param`]).
pub fn hf_param(gguf_tensor: &str, family: &str, num_layers: usize) -> Option<String> {
    let (base, suffix) = split_param(gguf_tensor)?;
    Some(format!("{}.{suffix}", hf_module(base, family, num_layers)?))
}

/// The HF module path of a llama.cpp module name (`blk.0.attn_q`), the inverse of
/// [`gguf_name`].
pub fn hf_module(base: &str, family: &str, num_layers: usize) -> Option<String> {
    let candidates = [
        "model.embed_tokens".to_string(),
        "model.embed_positions".into(),
        "model.norm".into(),
        "model.final_layernorm".into(),
        "lm_head".into(),
    ];
    if let Some(c) = candidates
        .iter()
        .find(|c| gguf_name(c, family).as_deref() == Some(base))
    {
        return Some(c.clone());
    }
    let layer: usize = base.strip_prefix("blk.")?.split('.').next()?.parse().ok()?;
    if layer >= num_layers {
        return None;
    }
    const LEAVES: &[&str] = &[
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "self_attn.qkv_proj",
        "mlp.gate_up_proj",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
    ];
    LEAVES
        .iter()
        .map(|leaf| format!("model.layers.{layer}.{leaf}"))
        .find(|m| gguf_name(m, family).as_deref() == Some(base))
}

/// A source of weights addressed by HF module paths.
pub trait WeightSource {
    fn path(&self) -> &Path;
    /// Whether `module.weight` exists.
    fn has(&self, module: &str) -> bool;
    /// The matrix `module.weight`, `[out, in]`.
    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight>;
    /// The vector `module.weight`, `[dim]`, as f32 (norm weights, already in the form the
    /// decoder multiplies by).
    fn vector(&self, module: &str, dim: usize) -> Result<Tensor>;
    /// The bias `module.bias`, `[dim]`, as f32.
    fn bias(&self, module: &str, dim: usize) -> Result<Tensor>;
    /// Stacked expert matrices `module.weight`, `[experts, out, in]` (mlx-lm's
    /// `switch_mlp`), as one `[experts * out, in]` weight whose row blocks are the experts.
    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight>;
    /// Parameters in all the source's tensors (packed weights counted by the values they
    /// hold).
    fn num_parameters(&self) -> usize;
}

fn shape_error(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Error {
    Error::format(
        path,
        None,
        format!("tensor '{name}' has shape {got:?}, expected {want:?}"),
    )
}

pub struct GgufWeights<'a> {
    pub gguf: &'a GgufFile,
    pub family: &'a str,
    pub device: &'a Device,
}

impl GgufWeights<'_> {
    fn name(&self, module: &str) -> Result<String> {
        gguf_name(module, self.family)
            .map(|n| format!("{n}.weight"))
            .ok_or_else(|| Error::Internal(format!("no GGUF name for module '{module}'")))
    }

    fn get(
        &self,
        module: &str,
        expected: &[usize],
    ) -> Result<Arc<candle_core::quantized::QTensor>> {
        let name = self.name(module)?;
        let info = self.gguf.tensors.get(&name).ok_or_else(|| {
            Error::format(&self.gguf.path, None, format!("tensor '{name}' is missing"))
        })?;
        if info.shape.dims() != expected {
            return Err(shape_error(
                &self.gguf.path,
                &name,
                info.shape.dims(),
                expected,
            ));
        }
        Ok(Arc::new(self.gguf.tensor(&name, self.device)?))
    }
}

impl WeightSource for GgufWeights<'_> {
    fn path(&self) -> &Path {
        &self.gguf.path
    }

    fn has(&self, module: &str) -> bool {
        self.name(module).is_ok_and(|n| self.gguf.has_tensor(&n))
    }

    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight> {
        Weight::from_ggml(self.get(module, &[out, inp])?)
    }

    fn vector(&self, module: &str, dim: usize) -> Result<Tensor> {
        // llama.cpp's converter already folds Gemma's `1 + w` into its norm weights.
        dense(self.get(module, &[dim])?.as_ref(), self.device)
    }

    fn bias(&self, module: &str, dim: usize) -> Result<Tensor> {
        let name = self.name(module)?.replace(".weight", ".bias");
        let info = self.gguf.tensors.get(&name).ok_or_else(|| {
            Error::format(&self.gguf.path, None, format!("tensor '{name}' is missing"))
        })?;
        if info.shape.dims() != [dim] {
            return Err(shape_error(
                &self.gguf.path,
                &name,
                info.shape.dims(),
                &[dim],
            ));
        }
        dense(&self.gguf.tensor(&name, self.device)?, self.device)
    }

    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight> {
        // `[experts, out, in]` as one matrix of `experts * out` rows (expert-major), whose
        // row blocks are the experts' matrices.
        let q = self.get(module, &[experts, out, inp])?;
        let flat = candle_core::quantized::ggml_file::qtensor_from_ggml(
            q.dtype(),
            &q.data()?,
            vec![experts * out, inp],
            self.device,
        )?;
        Weight::from_ggml(Arc::new(flat))
    }

    fn num_parameters(&self) -> usize {
        self.gguf
            .tensors
            .values()
            .map(|t| t.shape.elem_count())
            .sum()
    }
}

/// Bits and group size of quantized modules (`config.json`'s `quantization`).
#[derive(Debug, Clone, Default)]
pub struct QuantConfig {
    pub default: Option<(u32, usize)>,
    /// Per-module overrides (mixed precision).
    pub overrides: HashMap<String, (u32, usize)>,
}

impl QuantConfig {
    pub fn from_config_json(config: &serde_json::Value) -> Result<Self> {
        let Some(q) = config
            .get("quantization")
            .or_else(|| config.get("quantization_config"))
        else {
            return Ok(QuantConfig::default());
        };
        let q = q
            .as_object()
            .ok_or_else(|| Error::config("quantization", "expected an object"))?;
        let pair =
            |field: &str, v: &serde_json::Map<String, serde_json::Value>| -> Result<(u32, usize)> {
                let bits = v.get("bits").and_then(|b| b.as_u64());
                let group = v.get("group_size").and_then(|g| g.as_u64());
                let (b, g) = match (
                    bits.and_then(|b| u32::try_from(b).ok()),
                    group.and_then(|g| usize::try_from(g).ok()),
                ) {
                    (Some(b), Some(g)) => (b, g),
                    _ => {
                        return Err(Error::config(
                            field,
                            "needs integer 'bits' and 'group_size'",
                        ))
                    }
                };
                // Checked here, not only where a matrix is read: both divide sizes (packed
                // widths, parameter counts, the converter's plan) before any matrix is.
                if !SUPPORTED_BITS.contains(&b) {
                    return Err(Error::config(
                        format!("{field}.bits"),
                        format!("{b} is not supported (supported: {SUPPORTED_BITS:?})"),
                    ));
                }
                if !SUPPORTED_GROUP_SIZES.contains(&g) {
                    return Err(Error::config(
                        format!("{field}.group_size"),
                        format!("{g} is not supported (supported: {SUPPORTED_GROUP_SIZES:?})"),
                    ));
                }
                Ok((b, g))
            };
        if let Some(mode) = q.get("mode").and_then(|m| m.as_str()) {
            if mode != "affine" {
                return Err(Error::config(
                    "quantization.mode",
                    format!("'{mode}' is not supported (supported: affine)"),
                ));
            }
        }
        let mut overrides = HashMap::new();
        for (k, v) in q {
            if let Some(obj) = v.as_object() {
                overrides.insert(k.clone(), pair(&format!("quantization.{k}"), obj)?);
            }
        }
        Ok(QuantConfig {
            default: Some(pair("quantization", q)?),
            overrides,
        })
    }

    pub fn for_module(&self, module: &str) -> Option<(u32, usize)> {
        self.overrides.get(module).copied().or(self.default)
    }
}

/// Safetensors files of a model folder, with each tensor's file.
pub struct FolderWeights {
    pub dir: PathBuf,
    pub files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    pub quant: QuantConfig,
    /// Added to every norm weight: HF Gemma stores `w` and multiplies by `1 + w`.
    pub norm_offset: f32,
    /// GPT-2's own module names, when the folder holds GPT-2.
    pub gpt2: Option<Gpt2Layout>,
    pub device: Device,
}

/// GPT-2 checkpoints keep the original code's module names (`h.0.attn.c_attn`) and store
/// Conv1D weights `[in, out]`. `GPT2LMHeadModel` prefixes them with `transformer.`,
/// `GPT2Model` with nothing, and mlx-lm with `model.` (having transposed the Conv1D
/// weights to `[out, in]`, as it does on load).
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Layout {
    pub prefix: &'static str,
    /// Conv1D weights are stored `[in, out]`.
    pub conv1d: bool,
}

/// A GPT-2 layer's modules: the decoder's name, GPT-2's, and whether it is a Conv1D.
const GPT2_LAYER_MODULES: &[(&str, &str, bool)] = &[
    ("input_layernorm", "ln_1", false),
    ("post_attention_layernorm", "ln_2", false),
    ("self_attn.qkv_proj", "attn.c_attn", true),
    ("self_attn.o_proj", "attn.c_proj", true),
    ("mlp.fc1", "mlp.c_fc", true),
    ("mlp.fc2", "mlp.c_proj", true),
];

impl Gpt2Layout {
    /// Recognises the layout from the tensor names.
    pub fn detect(has: impl Fn(&str) -> bool) -> Option<Self> {
        ["transformer.", "", "model."]
            .into_iter()
            .find(|p| has(&format!("{p}wte.weight")))
            .map(|prefix| Gpt2Layout {
                prefix,
                conv1d: prefix != "model.",
            })
    }

    /// The stored module behind one of the decoder's module names, and whether it is a
    /// Conv1D whose weight is stored transposed.
    pub fn stored(&self, module: &str) -> Option<(String, bool)> {
        let p = self.prefix;
        let top = match module {
            "model.embed_tokens" => Some("wte"),
            "model.embed_positions" => Some("wpe"),
            "model.norm" => Some("ln_f"),
            _ => None,
        };
        if let Some(top) = top {
            return Some((format!("{p}{top}"), false));
        }
        let (layer, leaf) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let &(_, name, conv) = GPT2_LAYER_MODULES.iter().find(|(ours, ..)| *ours == leaf)?;
        Some((format!("{p}h.{layer}.{name}"), conv && self.conv1d))
    }

    /// Whether a stored parameter is one of the Conv1D weights.
    pub fn is_conv1d_weight(name: &str) -> bool {
        GPT2_LAYER_MODULES.iter().any(|&(_, theirs, conv)| {
            conv && name
                .strip_suffix(".weight")
                .is_some_and(|m| m.ends_with(theirs))
        })
    }

    /// Buffers some checkpoints carry that are not parameters (the causal mask).
    pub fn is_buffer(name: &str) -> bool {
        name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
    }
}

/// Checks that a shard name from an index stays inside the model folder (RELIABILITY A19).
pub(crate) fn shard_path(dir: &Path, index_path: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || name.contains('\\') || name.contains("://") {
        return Err(Error::format(
            index_path,
            None,
            format!("shard path '{name}' escapes model directory"),
        ));
    }
    let path = dir.join(rel);
    if let (Ok(real), Ok(real_dir)) = (path.canonicalize(), dir.canonicalize()) {
        // A Hugging Face cache snapshot (`models--org--name/snapshots/<commit>/`) links
        // its files to the repo's `blobs/`: that is inside the model too.
        let blobs = real_dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
            .and_then(Path::parent)
            .map(|repo| repo.join("blobs"));
        let in_blobs = blobs.is_some_and(|b| real.parent() == Some(b.as_path()));
        if !real.starts_with(&real_dir) && !in_blobs {
            return Err(Error::format(
                index_path,
                None,
                format!("shard path '{name}' escapes model directory (symlink)"),
            ));
        }
    }
    Ok(path)
}

impl FolderWeights {
    /// Opens every weight file of `dir` (validating each header) and the quantization
    /// settings of `config`.
    pub fn open(dir: &Path, config: &serde_json::Value, norm_offset: f32) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, None, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, None, "no 'weight_map' object"))?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            let mut wanted: Vec<(String, String)> = Vec::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    Error::format(
                        &index_path,
                        None,
                        format!("weight_map['{tensor}'] is not a string"),
                    )
                })?;
                shard_path(dir, &index_path, shard)?;
                let next = shard_ids.len();
                shard_ids.entry(shard.to_string()).or_insert(next);
                wanted.push((tensor.clone(), shard.to_string()));
            }
            let mut by_id: Vec<(&String, &usize)> = shard_ids.iter().collect();
            by_id.sort_by_key(|(_, &i)| i);
            for (shard, _) in by_id {
                let path = shard_path(dir, &index_path, shard)?;
                if !path.is_file() {
                    return Err(Error::format(
                        &index_path,
                        None,
                        format!("shard '{shard}' listed in the index does not exist"),
                    ));
                }
                files.push(SafetensorsFile::open(&path)?);
            }
            for (tensor, shard) in wanted {
                let id = shard_ids[&shard];
                if !files[id].tensors.contains_key(&tensor) {
                    return Err(Error::format(
                        &index_path,
                        None,
                        format!("tensor '{tensor}' is not in shard '{shard}' as the index says"),
                    ));
                }
                index.insert(tensor, id);
            }
        } else {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            paths.sort();
            if paths.is_empty() {
                return Err(Error::ModelNotFound {
                    path: dir.to_path_buf(),
                    message: "no model weights (.safetensors or .gguf) in directory".into(),
                });
            }
            for (id, path) in paths.iter().enumerate() {
                let f = SafetensorsFile::open(path)?;
                for name in f.tensors.keys() {
                    if index.insert(name.clone(), id).is_some() {
                        return Err(Error::format(
                            path,
                            None,
                            format!("tensor '{name}' appears in two weight files"),
                        ));
                    }
                }
                files.push(f);
            }
        }
        let gpt2 = (config.get("model_type").and_then(|t| t.as_str()) == Some("gpt2"))
            .then(|| Gpt2Layout::detect(|n| index.contains_key(n)))
            .flatten();
        Ok(FolderWeights {
            dir: dir.to_path_buf(),
            files,
            gpt2,
            quant: QuantConfig::from_config_json(config)?,
            index,
            norm_offset,
            device: Device::Cpu,
        })
    }

    /// The stored module behind a decoder module name, and whether its weight is a
    /// transposed Conv1D (GPT-2); other families store modules under their own names.
    fn stored(&self, module: &str) -> (String, bool) {
        self.gpt2
            .as_ref()
            .and_then(|g| g.stored(module))
            .unwrap_or_else(|| (module.to_string(), false))
    }

    /// The file holding `name`, and its entry.
    pub fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        self.index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| Error::format(&self.dir, None, format!("tensor '{name}' is missing")))
    }

    /// Names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    fn checked(&self, name: &str, want: &[usize]) -> Result<&SafetensorsFile> {
        let f = self.file_of(name)?;
        let got = &f.get(name)?.shape;
        if got != want {
            return Err(shape_error(&f.path, name, got, want));
        }
        Ok(f)
    }

    /// Whether `module` is stored MLX-quantized (has `module.scales`).
    pub fn is_quantized(&self, module: &str) -> bool {
        self.index.contains_key(&format!("{module}.scales"))
    }

    /// The affine matrix `module`: `[lead.., in]` before packing (`lead` is `[out]`, or
    /// `[experts, out]` for stacked experts), as `[product(lead), in]`.
    pub fn affine(&self, module: &str, lead: &[usize], inp: usize) -> Result<AffineMatrix> {
        let (bits, group) = self.quant.for_module(module).ok_or_else(|| {
            Error::config(
                "quantization",
                format!("'{module}' is quantized but config.json has no 'quantization' settings"),
            )
        })?;
        crate::quant::affine::check_params(bits, group, inp)
            .map_err(|e| Error::config(format!("quantization.{module}"), e.to_string()))?;
        let (w, s, b) = (
            format!("{module}.weight"),
            format!("{module}.scales"),
            format!("{module}.biases"),
        );
        let shape = |last: usize| [lead, &[last]].concat();
        let out: usize = lead.iter().product();
        let packed = self
            .checked(&w, &shape(inp * bits as usize / 32))?
            .u32s(&w)?;
        let sf = self.checked(&s, &shape(inp / group))?;
        let scale_dtype = match sf.get(&s)?.dtype {
            Dtype::F32 => ScaleDType::F32,
            Dtype::F16 => ScaleDType::F16,
            Dtype::BF16 => ScaleDType::BF16,
            other => {
                return Err(Error::format(
                    &sf.path,
                    None,
                    format!("tensor '{s}' has dtype {other}, expected a float type"),
                ))
            }
        };
        let scales = sf.f32s(&s)?;
        let biases = self.checked(&b, &shape(inp / group))?.f32s(&b)?;
        AffineMatrix::from_parts(out, inp, bits, group, packed, scales, biases, scale_dtype)
    }

    /// A dense float tensor as f32 values after checking its shape.
    pub fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.checked(name, shape)?.f32s(name)
    }
}

impl WeightSource for FolderWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn has(&self, module: &str) -> bool {
        self.index
            .contains_key(&format!("{}.weight", self.stored(module).0))
    }

    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight> {
        let (module, conv1d) = self.stored(module);
        if self.is_quantized(&module) {
            return Ok(Weight::from_affine(&self.affine(&module, &[out], inp)?));
        }
        let name = format!("{module}.weight");
        let values = if conv1d {
            transpose(&self.dense_f32(&name, &[inp, out])?, inp, out)
        } else {
            self.dense_f32(&name, &[out, inp])?
        };
        Ok(Weight::Dense(Tensor::from_vec(
            values,
            (out, inp),
            &self.device,
        )?))
    }

    fn vector(&self, module: &str, dim: usize) -> Result<Tensor> {
        let name = format!("{}.weight", self.stored(module).0);
        let mut values = self.dense_f32(&name, &[dim])?;
        if self.norm_offset != 0.0 {
            values.iter_mut().for_each(|v| *v += self.norm_offset);
        }
        Ok(Tensor::from_vec(values, dim, &self.device)?)
    }

    fn bias(&self, module: &str, dim: usize) -> Result<Tensor> {
        let values = self.dense_f32(&format!("{}.bias", self.stored(module).0), &[dim])?;
        Ok(Tensor::from_vec(values, dim, &self.device)?)
    }

    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight> {
        if self.is_quantized(module) {
            return Ok(Weight::from_affine(&self.affine(
                module,
                &[experts, out],
                inp,
            )?));
        }
        let values = self.dense_f32(&format!("{module}.weight"), &[experts, out, inp])?;
        Ok(Weight::Dense(Tensor::from_vec(
            values,
            (experts * out, inp),
            &self.device,
        )?))
    }

    fn num_parameters(&self) -> usize {
        // Packed weights count as the values they hold; scales and biases are overhead.
        self.index
            .keys()
            .filter(|n| n.ends_with(".weight"))
            .map(|n| {
                let module = &n[..n.len() - ".weight".len()];
                let numel = self
                    .file_of(n)
                    .and_then(|f| f.get(n).map(|t| t.numel()))
                    .unwrap_or(0);
                match (self.is_quantized(module), self.quant.for_module(module)) {
                    (true, Some((bits, _))) => numel * 32 / bits as usize,
                    _ => numel,
                }
            })
            .sum()
    }
}
