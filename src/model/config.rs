//! Decoder configuration with Hugging Face field names (`num_key_value_heads`,
//! `rope_theta`...), read from GGUF metadata (llama.cpp's `{arch}.*` keys, as written by
//! `convert_hf_to_gguf.py`). Every size is range-checked here, before anything is allocated
//! from it, and checked again against the tensors' real shapes at load.

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

/// Architectures (`general.architecture`) the decoder runs. Mistral GGUFs are written with
/// `llama` by llama.cpp's converter; `mistral` is accepted as an alias.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "gemma3", "qwen2", "qwen3", "qwen3moe", "phi3", "phi2", "gpt2",
];

/// Upper bounds that no real model reaches; a config past them is corrupt or hostile.
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_CONTEXT: usize = 1 << 24;
const MAX_VOCAB: usize = 1 << 24;
const MAX_HIDDEN: usize = 1 << 17;

/// RoPE frequency scaling (HF `rope_scaling`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f32 },
    /// Per-frequency factors stored in the file (llama 3's `rope_freqs.weight`): each
    /// inverse frequency is divided by its factor.
    Llama3,
    /// Llama 3's scaling from its `config.json` parameters (HF `rope_type: llama3`):
    /// low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3Params {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN (Peng et al. 2023, HF `rope_type: yarn`): frequencies past the original
    /// context are interpolated by `factor`, short wavelengths kept, with a linear ramp
    /// between the `beta_fast` and `beta_slow` rotation counts; the rotated dimensions are
    /// scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        truncate: bool,
    },
}

/// Mixture-of-experts settings (HF `Qwen3MoeConfig` names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse...
    pub decoder_sparse_step: usize,
    /// ...except these, which keep a dense MLP of `intermediate_size`.
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `i` (from 0) uses the experts (HF `Qwen3MoeDecoderLayer`).
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// The MLP's gate activation (HF `hidden_act` / `hidden_activation` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU (llama family).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluPytorchTanh,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub hidden_act: Activation,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` (Gemma's name; the head
    /// dimension for the llama family).
    pub query_pre_attn_scalar: f64,
    /// RMSNorm over each head of q and k before RoPE (Gemma 3, Qwen 3).
    pub use_qk_norm: bool,
    /// Biases on the q/k/v projections (Qwen 2; llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// q/k/v stored as one `qkv_proj`, gate/up as one `gate_up_proj` (Phi 3).
    pub fused_projections: bool,
    /// Mixture-of-experts feed-forward layers (Qwen 3 MoE).
    pub moe: Option<MoeConfig>,
    /// Phi: attention and the MLP side by side on one normalised input, a biased output
    /// head.
    pub phi_block: bool,
    /// LayerNorm with biases instead of RMSNorm (Phi, GPT-2).
    pub layer_norm: bool,
    /// A plain two-layer MLP `fc2(act(fc1(x)))` with biases instead of a gated one (Phi,
    /// GPT-2).
    pub plain_mlp: bool,
    /// Learned absolute position embeddings added to the token embeddings, and no RoPE
    /// (GPT-2; `rotary_dim` is 0).
    pub learned_positions: bool,
    /// Leading dimensions of each head that RoPE turns (HF `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Norms after attention and after the MLP too, before the residual adds (Gemma 2/3).
    pub sandwich_norms: bool,
    /// Embeddings multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// RoPE on adjacent pairs, the layout llama.cpp's converter gives llama-family q/k
    /// weights; otherwise on the two halves of each head (GPT-NeoX / HF `rotate_half`).
    pub rope_interleaved: bool,
    /// Local layers attend to the last `sliding_window` positions only.
    pub sliding_window: Option<usize>,
    /// Every `sliding_window_pattern`-th layer is global, the others local (Gemma 3: 6).
    pub sliding_window_pattern: Option<usize>,
    /// RoPE base of the local layers.
    pub rope_local_base_freq: Option<f32>,
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => as_u64(v).map(|x| x as f64),
    }
}

/// Reads an unsigned integer metadata key, `None` when absent.
pub(crate) fn meta_usize(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => as_u64(v)
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::config(key, format!("expected a non-negative integer, got {v:?}"))
            }),
    }
}

fn meta_f64(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => as_f64(v)
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| Error::config(key, format!("expected a finite number, got {v:?}"))),
    }
}

fn required(g: &GgufFile, key: &str) -> Result<usize> {
    meta_usize(g, key)?.ok_or_else(|| Error::config(key, "missing from the GGUF metadata"))
}

fn check_range(field: &str, value: usize, max: usize) -> Result<usize> {
    if value == 0 || value > max {
        return Err(Error::config(
            field,
            format!("{value} is outside 1..={max}"),
        ));
    }
    Ok(value)
}

impl ModelConfig {
    /// Builds the configuration from GGUF metadata (`general.architecture` and the
    /// `{arch}.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = match g.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                return Err(Error::config(
                    "general.architecture",
                    format!("expected a string, got {v:?}"),
                ))
            }
            None => {
                return Err(Error::config(
                    "general.architecture",
                    "missing from the GGUF metadata",
                ))
            }
        };
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(Error::UnsupportedArchitecture {
                architecture: arch,
                supported: SUPPORTED_ARCHITECTURES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            });
        }
        let k = |name: &str| format!("{arch}.{name}");
        let hidden_size = check_range(
            &k("embedding_length"),
            required(g, &k("embedding_length"))?,
            MAX_HIDDEN,
        )?;
        let intermediate_size = check_range(
            &k("feed_forward_length"),
            required(g, &k("feed_forward_length"))?,
            16 * MAX_HIDDEN,
        )?;
        let num_hidden_layers = check_range(
            &k("block_count"),
            required(g, &k("block_count"))?,
            MAX_LAYERS,
        )?;
        let num_attention_heads = check_range(
            &k("attention.head_count"),
            required(g, &k("attention.head_count"))?,
            MAX_HEADS,
        )?;
        let num_key_value_heads = match meta_usize(g, &k("attention.head_count_kv"))? {
            Some(n) => check_range(&k("attention.head_count_kv"), n, num_attention_heads)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                k("attention.head_count_kv"),
                format!("{num_key_value_heads} KV heads do not divide {num_attention_heads} attention heads"),
            ));
        }
        let head_dim = match meta_usize(g, &k("attention.key_length"))? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        k("attention.head_count"),
                        format!("embedding_length {hidden_size} is not divisible by {num_attention_heads} heads"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(Error::config(
                k("attention.key_length"),
                format!("head dim {head_dim} must be even and in 2..=1024"),
            ));
        }
        let (phi2, gpt2) = (arch == "phi2", arch == "gpt2");
        let rotary_dim = match meta_usize(g, &k("rope.dimension_count"))? {
            _ if gpt2 => 0,
            // phi-2 turns part of each head.
            Some(rot) if phi2 && rot > 0 && rot <= head_dim && rot % 2 == 0 => rot,
            Some(rot) if phi2 => {
                return Err(Error::config(
                    k("rope.dimension_count"),
                    format!("{rot} is not an even number of dimensions up to {head_dim}"),
                ))
            }
            _ => head_dim,
        };
        if let Some(rot) = meta_usize(g, &k("rope.dimension_count"))?.filter(|_| !phi2) {
            if rot != head_dim {
                return Err(Error::config(
                    k("rope.dimension_count"),
                    format!("partial rotary embeddings ({rot} of {head_dim} dims) are not supported for {arch}"),
                ));
            }
        }
        if let Some(v) = meta_usize(g, &k("attention.value_length"))? {
            if v != head_dim {
                return Err(Error::config(
                    k("attention.value_length"),
                    format!("value head dim {v} differs from the key head dim {head_dim}"),
                ));
            }
        }
        let vocab_size = match meta_usize(g, &k("vocab_size"))? {
            Some(v) => v,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => g
                    .tensors
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| {
                        Error::config(
                            k("vocab_size"),
                            "missing, and no tokenizer or embedding to infer it from",
                        )
                    })?,
            },
        };
        let vocab_size = check_range(&k("vocab_size"), vocab_size, MAX_VOCAB)?;
        let max_position_embeddings = check_range(
            &k("context_length"),
            required(g, &k("context_length"))?,
            MAX_CONTEXT,
        )?;
        // Strangely absent from some older files; llama.cpp's default then applies.
        let eps_key = if phi2 || gpt2 {
            k("attention.layer_norm_epsilon")
        } else {
            k("attention.layer_norm_rms_epsilon")
        };
        let rms_norm_eps = meta_f64(g, &eps_key)?.unwrap_or(1e-5);
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(Error::config(
                eps_key,
                format!("{rms_norm_eps} is not in (0, 1)"),
            ));
        }
        let rope_theta = meta_f64(g, &k("rope.freq_base"))?.unwrap_or(10_000.0);
        if rope_theta <= 1.0 {
            return Err(Error::config(
                k("rope.freq_base"),
                format!("{rope_theta} must be greater than 1"),
            ));
        }
        let rope_scaling = Self::rope_scaling(g, &arch)?;
        let gemma3 = arch == "gemma3";
        let (qwen2, phi3) = (arch == "qwen2", arch == "phi3");
        let qwen3moe = arch == "qwen3moe";
        let qwen3 = arch == "qwen3" || qwen3moe;
        let sliding_window = if gemma3 {
            let key = k("attention.sliding_window");
            Some(check_range(&key, required(g, &key)?, MAX_CONTEXT)?)
        } else {
            None
        };
        // llama.cpp (`llama-model.cpp`): Gemma 3 27B (62 layers) scales by
        // hidden/heads, the other sizes by the head dimension.
        let query_pre_attn_scalar = if gemma3 && num_hidden_layers == 62 {
            (hidden_size / num_attention_heads) as f64
        } else {
            head_dim as f64
        };
        let moe = qwen3moe
            .then(|| Self::moe_from_gguf(g, &arch))
            .transpose()?;
        Ok(ModelConfig {
            model_type: arch,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta: rope_theta as f32,
            rope_scaling,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            hidden_act: if gemma3 || phi2 || gpt2 {
                Activation::GeluPytorchTanh
            } else {
                Activation::Silu
            },
            query_pre_attn_scalar,
            use_qk_norm: gemma3 || qwen3,
            qkv_bias: qwen2 || phi2 || gpt2,
            o_bias: phi2 || gpt2,
            mlp_bias: false,
            // GPT-2's q/k/v are fused (`attn_qkv`); phi-2 files have them apart.
            fused_projections: phi3 || gpt2,
            moe,
            phi_block: phi2,
            layer_norm: phi2 || gpt2,
            plain_mlp: phi2 || gpt2,
            learned_positions: gpt2,
            rotary_dim,
            sandwich_norms: gemma3,
            scale_embeddings: gemma3,
            // Only llama.cpp's llama converter permutes q/k for adjacent-pair RoPE.
            rope_interleaved: !(gemma3 || qwen2 || qwen3 || phi3 || phi2),
            sliding_window,
            // Fixed by the architecture (HF `sliding_window_pattern`, llama.cpp
            // `n_swa_pattern`; not stored in GGUF), as is the local RoPE base.
            sliding_window_pattern: gemma3.then_some(6),
            rope_local_base_freq: gemma3.then_some(10_000.0),
        })
    }

    fn rope_scaling(g: &GgufFile, arch: &str) -> Result<Option<RopeScaling>> {
        if g.has_tensor("rope_freqs.weight") {
            return Ok(Some(RopeScaling::Llama3));
        }
        let ty_key = format!("{arch}.rope.scaling.type");
        let ty = match g.get(&ty_key) {
            None => return Ok(None),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(Error::config(
                    ty_key,
                    format!("expected a string, got {v:?}"),
                ))
            }
        };
        let factor_key = format!("{arch}.rope.scaling.factor");
        match ty {
            "none" => Ok(None),
            "linear" => {
                let factor = meta_f64(g, &factor_key)?.ok_or_else(|| Error::config(&factor_key, "missing for linear rope scaling"))?;
                if factor <= 0.0 {
                    return Err(Error::config(factor_key, format!("factor {factor} must be positive")));
                }
                Ok(if factor == 1.0 { None } else { Some(RopeScaling::Linear { factor: factor as f32 }) })
            }
            other => Err(Error::config(ty_key, format!("rope scaling type '{other}' is not supported (supported: none, linear, llama3 via rope_freqs)"))),
        }
    }
}

/// `model_type` values of `config.json` the decoder runs, each with the family it maps
/// onto (aliases share an adapter).
pub const SUPPORTED_MODEL_TYPES: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "llama"),
    ("gemma3_text", "gemma3"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("phi3", "phi3"),
    ("qwen3_moe", "qwen3_moe"),
    ("phi", "phi"),
    ("gpt2", "gpt2"),
];

/// GPT-2's `config.json` names (`GPT2Config`) for the fields the other families share.
const GPT2_FIELDS: &[(&str, &str)] = &[
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_positions", "max_position_embeddings"),
    ("n_inner", "intermediate_size"),
    ("layer_norm_epsilon", "layer_norm_eps"),
    ("activation_function", "hidden_act"),
];

/// Typed access to `config.json` fields; every error names the field.
struct HfFields<'a>(&'a serde_json::Map<String, serde_json::Value>);

impl HfFields<'_> {
    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::config(field, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    fn usize(&self, field: &str, max: usize) -> Result<usize> {
        let v = self
            .opt_usize(field)?
            .ok_or_else(|| Error::config(field, "missing from config.json"))?;
        check_range(field, v, max)
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| Error::config(field, format!("expected a finite number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::config(field, format!("expected true or false, got {v}"))),
        }
    }

    fn str_or<'b>(&'b self, field: &str, default: &'b str) -> Result<&'b str> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::config(field, format!("expected a string, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// GPT-2's config under the shared field names; settings the decoder does not
    /// implement are refused.
    fn gpt2_fields(
        map: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let f = HfFields(map);
        if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
            return Err(Error::config(
                "scale_attn_by_inverse_layer_idx",
                "per-layer attention scaling is not supported",
            ));
        }
        if !f.bool_or("scale_attn_weights", true)? {
            return Err(Error::config(
                "scale_attn_weights",
                "attention without 1/sqrt(head_dim) scaling is not supported",
            ));
        }
        let mut out = map.clone();
        for (theirs, ours) in GPT2_FIELDS {
            if let Some(v) = map.get(*theirs) {
                out.insert(ours.to_string(), v.clone());
            }
        }
        // `n_inner: null` means four times the width.
        if out.get("intermediate_size").is_none_or(|v| v.is_null()) {
            let d = f.usize("n_embd", MAX_HIDDEN)?;
            out.insert("intermediate_size".into(), (4 * d).into());
        }
        Ok(out)
    }

    /// YaRN's settings from `rope_scaling` (transformers' defaults and attention factor).
    fn yarn_from_hf(
        v: &serde_json::Value,
        factor: Option<f64>,
        max_position_embeddings: usize,
        top_level_original: Option<&serde_json::Value>,
    ) -> Result<RopeScaling> {
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        let original = v
            .get("original_max_position_embeddings")
            .or(top_level_original)
            .and_then(|x| x.as_u64())
            .map_or(max_position_embeddings, |x| x as usize);
        let factor = factor.unwrap_or(max_position_embeddings as f64 / original as f64);
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if !positive(factor) || original == 0 {
            return Err(Error::config(
                "rope_scaling",
                "yarn needs a positive factor and original_max_position_embeddings",
            ));
        }
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match (
            num("attention_factor"),
            num("mscale"),
            num("mscale_all_dim"),
        ) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(factor, m) / mscale(factor, all)
            }
            _ => mscale(factor, 1.0),
        };
        let beta_fast = num("beta_fast").unwrap_or(32.0);
        let beta_slow = num("beta_slow").unwrap_or(1.0);
        if ![attention_factor, beta_fast, beta_slow]
            .into_iter()
            .all(positive)
        {
            return Err(Error::config(
                "rope_scaling",
                "yarn's attention_factor, beta_fast and beta_slow must be positive",
            ));
        }
        Ok(RopeScaling::Yarn {
            factor: factor as f32,
            original_max_position_embeddings: original,
            beta_fast: beta_fast as f32,
            beta_slow: beta_slow as f32,
            attention_factor: attention_factor as f32,
            truncate: v.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
        })
    }

    /// Builds the configuration from a Hugging Face `config.json` (already parsed), mapping
    /// `model_type` through [`SUPPORTED_MODEL_TYPES`]. Defaults are those of the
    /// transformers config classes.
    pub fn from_hf(json: &serde_json::Value) -> Result<Self> {
        let map = json
            .as_object()
            .ok_or_else(|| Error::config("config.json", "expected a JSON object"))?;
        let gpt2 = HfFields(map).str_or("model_type", "")? == "gpt2";
        let renamed;
        let map = if gpt2 {
            renamed = Self::gpt2_fields(map)?;
            &renamed
        } else {
            map
        };
        let (map, spelled) = v4_spellings(map)?;
        // Errors name the field as this file spells it.
        Self::from_hf_fields(&map).map_err(|e| match e {
            Error::Config { field, message } => {
                let field = spelled
                    .iter()
                    .find_map(|(v4, theirs)| {
                        let rest = field.strip_prefix(v4.as_str())?;
                        (rest.is_empty() || rest.starts_with('.'))
                            .then(|| format!("{theirs}{rest}"))
                    })
                    .unwrap_or(field);
                Error::Config { field, message }
            }
            other => other,
        })
    }

    /// [`Self::from_hf`] on the 4.x spellings.
    fn from_hf_fields(map: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let gpt2 = HfFields(map).str_or("model_type", "")? == "gpt2";
        let f = HfFields(map);
        let model_type = f.str_or("model_type", "")?;
        let family = SUPPORTED_MODEL_TYPES
            .iter()
            .find(|(t, _)| *t == model_type)
            .map(|(_, fam)| *fam)
            .ok_or_else(|| Error::UnsupportedArchitecture {
                architecture: if model_type.is_empty() {
                    "(config.json has no model_type)".into()
                } else {
                    model_type.to_string()
                },
                supported: SUPPORTED_MODEL_TYPES
                    .iter()
                    .map(|(t, _)| t.to_string())
                    .collect(),
            })?;
        let gemma3 = family == "gemma3";
        let qwen = matches!(family, "qwen2" | "qwen3" | "qwen3_moe");
        if qwen && f.bool_or("use_sliding_window", false)? {
            return Err(Error::config(
                "use_sliding_window",
                "Qwen's per-layer sliding window (max_window_layers) is not supported",
            ));
        }
        let phi = family == "phi";
        let layer_norm = phi || gpt2;
        let hidden_size = f.usize("hidden_size", MAX_HIDDEN)?;
        let intermediate_size = f.usize("intermediate_size", 16 * MAX_HIDDEN)?;
        let num_hidden_layers = f.usize("num_hidden_layers", MAX_LAYERS)?;
        let num_attention_heads = f.usize("num_attention_heads", MAX_HEADS)?;
        let num_key_value_heads = match f.opt_usize("num_key_value_heads")? {
            Some(n) => check_range("num_key_value_heads", n, num_attention_heads)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{num_key_value_heads} KV heads do not divide {num_attention_heads} attention heads"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(Error::config(
                    "num_attention_heads",
                    format!(
                        "hidden_size {hidden_size} is not divisible by {num_attention_heads} heads"
                    ),
                ))
            }
        };
        let partial = f.f64_or("partial_rotary_factor", if phi { 0.5 } else { 1.0 })?;
        let rotary_dim = if gpt2 {
            0
        } else {
            (head_dim as f64 * partial) as usize
        };
        if !gpt2 && (!(partial > 0.0 && partial <= 1.0) || rotary_dim == 0 || rotary_dim % 2 != 0) {
            return Err(Error::config(
                "partial_rotary_factor",
                format!("{partial} of head dim {head_dim} is not an even number of dimensions"),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(Error::config(
                "head_dim",
                format!("head dim {head_dim} must be even and in 2..=1024"),
            ));
        }
        let vocab_size = f.usize("vocab_size", MAX_VOCAB)?;
        let max_position_embeddings = match f.opt_usize("max_position_embeddings")? {
            Some(n) => check_range("max_position_embeddings", n, MAX_CONTEXT)?,
            None if gemma3 => 131_072,
            None if gpt2 => 1024,
            None => 2048,
        };
        let rms_norm_eps = f.f64_or(
            if layer_norm {
                "layer_norm_eps"
            } else {
                "rms_norm_eps"
            },
            1e-6,
        )?;
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(Error::config(
                "rms_norm_eps",
                format!("{rms_norm_eps} is not in (0, 1)"),
            ));
        }
        let rope_theta = f.f64_or("rope_theta", if gemma3 { 1_000_000.0 } else { 10_000.0 })?;
        check_rope_base("rope_theta", rope_theta)?;
        let rope_scaling = match map.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let ty = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                let factor = v.get("factor").and_then(|x| x.as_f64());
                let num = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_f64())
                        .filter(|x| *x > 0.0 && x.is_finite())
                };
                match (ty, factor) {
                    ("default", _) => None,
                    ("llama3", Some(factor)) if factor >= 1.0 && factor.is_finite() => {
                        let (Some(low), Some(high), Some(original)) = (
                            num("low_freq_factor"),
                            num("high_freq_factor"),
                            num("original_max_position_embeddings"),
                        ) else {
                            return Err(Error::config(
                                "rope_scaling",
                                "llama3 scaling needs positive low_freq_factor, high_freq_factor and original_max_position_embeddings",
                            ));
                        };
                        if high <= low {
                            return Err(Error::config(
                                "rope_scaling",
                                "high_freq_factor must exceed low_freq_factor",
                            ));
                        }
                        // Divides the wavelength bounds; below one position it truncates to 0.
                        if original < 1.0 {
                            return Err(Error::config(
                                "rope_scaling.original_max_position_embeddings",
                                format!("{original} must be at least 1"),
                            ));
                        }
                        Some(RopeScaling::Llama3Params {
                            factor: factor as f32,
                            low_freq_factor: low as f32,
                            high_freq_factor: high as f32,
                            original_max_position_embeddings: original as usize,
                        })
                    }
                    ("yarn", _) => Some(Self::yarn_from_hf(
                        v,
                        factor,
                        max_position_embeddings,
                        map.get("original_max_position_embeddings"),
                    )?),
                    ("linear", Some(factor)) if factor > 0.0 && factor.is_finite() => {
                        (factor != 1.0).then_some(RopeScaling::Linear {
                            factor: factor as f32,
                        })
                    }
                    _ => {
                        return Err(Error::config(
                            "rope_scaling",
                            format!("{v} is not supported (supported: linear, llama3, yarn)"),
                        ))
                    }
                }
            }
        };
        // llama / Qwen 3 `attention_bias`: q/k/v/o biases (Qwen 2 always has q/k/v ones).
        let attention_bias = f.bool_or("attention_bias", false)?;
        let act_field = if gemma3 {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let hidden_act = match f.str_or(
            act_field,
            if gemma3 || gpt2 {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            },
        )? {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Activation::GeluPytorchTanh,
            other => {
                return Err(Error::config(
                    act_field,
                    format!(
                    "activation '{other}' is not supported (supported: silu, gelu_pytorch_tanh)"
                ),
                ))
            }
        };
        let sliding_window = match f.opt_usize("sliding_window")? {
            // Qwen configs carry a window that applies only with `use_sliding_window`.
            Some(_) if qwen => None,
            Some(w) => Some(check_range("sliding_window", w, MAX_CONTEXT)?),
            None if gemma3 => Some(4096),
            None => None,
        };
        let sliding_window_pattern = if gemma3 {
            Some(match f.opt_usize("sliding_window_pattern")? {
                // The loader takes each layer's index modulo the pattern.
                Some(n) => check_range("sliding_window_pattern", n, MAX_LAYERS)?,
                None => match map.get("layer_types") {
                    None | Some(serde_json::Value::Null) => 6,
                    Some(v) => pattern_of_layer_types(v, num_hidden_layers)?,
                },
            })
        } else {
            None
        };
        let query_pre_attn_scalar = if gemma3 {
            f.f64_or("query_pre_attn_scalar", 256.0)?
        } else {
            head_dim as f64
        };
        if query_pre_attn_scalar <= 0.0 {
            return Err(Error::config(
                "query_pre_attn_scalar",
                format!("{query_pre_attn_scalar} must be positive"),
            ));
        }
        Ok(ModelConfig {
            model_type: family.to_string(),
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta: rope_theta as f32,
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", gemma3 || gpt2)?,
            hidden_act,
            query_pre_attn_scalar,
            use_qk_norm: gemma3 || family == "qwen3" || family == "qwen3_moe",
            qkv_bias: family == "qwen2" || attention_bias || phi || gpt2,
            o_bias: attention_bias || phi || gpt2,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            fused_projections: family == "phi3" || gpt2,
            phi_block: phi,
            layer_norm,
            plain_mlp: phi || gpt2,
            learned_positions: gpt2,
            rotary_dim,
            moe: if family == "qwen3_moe" {
                Some(Self::moe_from_hf(&f)?)
            } else {
                None
            },
            sandwich_norms: gemma3,
            scale_embeddings: gemma3,
            // HF checkpoints rotate the two halves of each head (`rotate_half`).
            rope_interleaved: false,
            sliding_window,
            sliding_window_pattern,
            rope_local_base_freq: gemma3
                .then(|| {
                    let base = f.f64_or("rope_local_base_freq", 10_000.0)?;
                    check_rope_base("rope_local_base_freq", base).map(|()| base as f32)
                })
                .transpose()?,
        })
    }
}

/// A RoPE base: past 1 (the frequencies `base^(-2i/d)` must fall) and finite in f32, the
/// type the rotation tables are computed in.
fn check_rope_base(field: &str, base: f64) -> Result<()> {
    if base <= 1.0 || !(base as f32).is_finite() {
        return Err(Error::config(
            field,
            format!("{base} must be greater than 1 and at most {:e}", f32::MAX),
        ));
    }
    Ok(())
}

/// The Gemma 3 window pattern from transformers' per-layer `layer_types` (which replaced
/// `sliding_window_pattern`): every `n`-th layer `full_attention`, the others
/// `sliding_attention`; other layouts are refused, since the decoder runs only this one.
fn pattern_of_layer_types(v: &serde_json::Value, layers: usize) -> Result<usize> {
    let kinds: Vec<&str> = v
        .as_array()
        .and_then(|a| a.iter().map(|x| x.as_str()).collect())
        .ok_or_else(|| {
            Error::config(
                "layer_types",
                format!("expected a list of strings, got {v}"),
            )
        })?;
    if kinds.len() != layers {
        return Err(Error::config(
            "layer_types",
            format!("{} entries for {layers} layers", kinds.len()),
        ));
    }
    let full = |i: usize| kinds[i] == "full_attention";
    if let Some(bad) = kinds
        .iter()
        .find(|k| !matches!(**k, "full_attention" | "sliding_attention"))
    {
        return Err(Error::config(
            "layer_types",
            format!("'{bad}' is not supported (supported: full_attention, sliding_attention)"),
        ));
    }
    // With no global layer at all, any pattern longer than the model describes it.
    let n = (0..layers).find(|&i| full(i)).map_or(layers + 1, |i| i + 1);
    if (0..layers).any(|i| full(i) != (i + 1).is_multiple_of(n)) {
        return Err(Error::config(
            "layer_types",
            format!("{kinds:?} is not every {n}th layer global"),
        ));
    }
    Ok(n)
}

/// Field names of 4.x `config.json`s whose 5.x spelling differs, with the 5.x path.
type Spellings = Vec<(String, String)>;

/// `map` with the transformers 5.x spellings also written under their 4.x names (which
/// the rest of [`ModelConfig::from_hf`] reads), and which fields were moved:
/// * `num_local_experts` (5.x `Qwen3MoeConfig`'s attribute for `num_experts`);
/// * `rope_parameters` (5.x's one place for RoPE): its `rope_theta` and
///   `partial_rotary_factor`, and the rest as `rope_scaling`; or, keyed by layer type
///   (Gemma 3), `full_attention`'s as those and `sliding_attention`'s `rope_theta` as
///   `rope_local_base_freq`.
///
/// As transformers' `convert_rope_params_to_dict`, a 4.x `rope_scaling` object present
/// beside `rope_parameters` wins, and `rope_parameters`' `rope_theta` wins over the
/// top-level one.
fn v4_spellings(
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<(serde_json::Map<String, serde_json::Value>, Spellings)> {
    use serde_json::Value as J;
    let mut out = map.clone();
    let mut spelled = Spellings::new();
    let mut set = |out: &mut serde_json::Map<String, J>, v4: &str, v5: String, v: J| {
        out.insert(v4.to_string(), v);
        spelled.push((v4.to_string(), v5));
    };
    if let (None | Some(J::Null), Some(n)) = (map.get("num_experts"), map.get("num_local_experts"))
    {
        set(
            &mut out,
            "num_experts",
            "num_local_experts".into(),
            n.clone(),
        );
    }
    let Some(params) = map.get("rope_parameters").filter(|v| !v.is_null()) else {
        return Ok((out, spelled));
    };
    let object = |v: &J, field: &str| {
        v.as_object()
            .cloned()
            .ok_or_else(|| Error::config(field, format!("expected an object, got {v}")))
    };
    let params = object(params, "rope_parameters")?;
    let per_layer = !params.is_empty()
        && params
            .keys()
            .all(|k| matches!(k.as_str(), "full_attention" | "sliding_attention"));
    let (mut full, full_field) = match params.get("full_attention") {
        Some(v) if per_layer => (
            object(v, "rope_parameters.full_attention")?,
            "rope_parameters.full_attention",
        ),
        _ if per_layer => (serde_json::Map::new(), "rope_parameters.full_attention"),
        _ => (params.clone(), "rope_parameters"),
    };
    for key in ["rope_theta", "partial_rotary_factor"] {
        if let Some(v) = full.remove(key) {
            set(&mut out, key, format!("{full_field}.{key}"), v);
        }
    }
    let legacy_scaling = map
        .get("rope_scaling")
        .and_then(|v| v.as_object())
        .is_some_and(|o| !o.is_empty());
    if !legacy_scaling {
        if !full.contains_key("rope_type") && !full.contains_key("type") {
            full.insert("rope_type".into(), "default".into());
        }
        set(&mut out, "rope_scaling", full_field.into(), J::Object(full));
    }
    if let Some(v) = params.get("sliding_attention").filter(|_| per_layer) {
        let field = "rope_parameters.sliding_attention";
        let mut local = object(v, field)?;
        let ty = local.get("rope_type").or_else(|| local.get("type"));
        if ty.is_some_and(|t| t.as_str() != Some("default")) {
            return Err(Error::config(
                format!("{field}.rope_type"),
                format!(
                    "{} is not supported on local layers (supported: default)",
                    ty.unwrap_or(&J::Null)
                ),
            ));
        }
        if let Some(theta) = local.remove("rope_theta") {
            set(
                &mut out,
                "rope_local_base_freq",
                format!("{field}.rope_theta"),
                theta,
            );
        }
    }
    Ok((out, spelled))
}

impl ModelConfig {
    /// llama.cpp's `qwen3moe` keys; every layer is sparse and the chosen experts'
    /// weights are renormalised (`norm_topk_prob`), as llama.cpp runs it.
    fn moe_from_gguf(g: &GgufFile, arch: &str) -> Result<MoeConfig> {
        let k = |name: &str| format!("{arch}.{name}");
        let num_experts = check_range(&k("expert_count"), required(g, &k("expert_count"))?, 4096)?;
        let used = k("expert_used_count");
        Ok(MoeConfig {
            num_experts,
            num_experts_per_tok: check_range(&used, required(g, &used)?, num_experts)?,
            moe_intermediate_size: check_range(
                &k("expert_feed_forward_length"),
                required(g, &k("expert_feed_forward_length"))?,
                16 * MAX_HIDDEN,
            )?,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        })
    }

    fn moe_from_hf(f: &HfFields<'_>) -> Result<MoeConfig> {
        let num_experts = f.usize("num_experts", 4096)?;
        let num_experts_per_tok = f.usize("num_experts_per_tok", num_experts)?;
        let mlp_only_layers = match f.0.get("mlp_only_layers") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .ok_or_else(|| {
                    Error::config(
                        "mlp_only_layers",
                        format!("expected a list of layer indices, got {v}"),
                    )
                })?,
        };
        Ok(MoeConfig {
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size: f.usize("moe_intermediate_size", 16 * MAX_HIDDEN)?,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            decoder_sparse_step: match f.opt_usize("decoder_sparse_step")? {
                Some(n) => check_range("decoder_sparse_step", n, MAX_LAYERS)?,
                None => 1,
            },
            mlp_only_layers,
        })
    }
}

impl RopeScaling {
    /// Per-frequency divisors of the inverse frequencies for llama 3's parameters (HF
    /// `_compute_llama3_parameters`), `None` for the other kinds.
    /// What the rotated dimensions are multiplied by (YaRN's attention factor; else 1).
    pub fn attention_factor(&self) -> f32 {
        match *self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// Per-frequency divisors of the inverse frequencies, for the scalings computed from
    /// the config (llama 3, YaRN).
    pub fn frequency_factors(&self, head_dim: usize, theta: f32) -> Option<Vec<f32>> {
        if let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = *self
        {
            return Some(yarn_factors(
                head_dim, theta, factor, original, beta_fast, beta_slow, truncate,
            ));
        }
        let RopeScaling::Llama3Params {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        } = *self
        else {
            return None;
        };
        let original = original as f64;
        let (low_wavelen, high_wavelen) = (original / f64::from(low), original / f64::from(high));
        Some(
            (0..head_dim / 2)
                .map(|i| {
                    let inv = 1.0 / f64::from(theta).powf(2.0 * i as f64 / head_dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / inv;
                    let scaled = if wavelen < high_wavelen {
                        inv
                    } else if wavelen > low_wavelen {
                        inv / f64::from(factor)
                    } else {
                        let smooth = (original / wavelen - f64::from(low)) / f64::from(high - low);
                        (1.0 - smooth) * inv / f64::from(factor) + smooth * inv
                    };
                    (inv / scaled) as f32
                })
                .collect(),
        )
    }
}

/// YaRN's divisors, as transformers' `_compute_yarn_parameters`: pair `i` keeps its
/// frequency (extrapolation) below the ramp, is divided by `factor` (interpolation) above
/// it, and blends linearly across it; the ramp runs between the pair indices at which a
/// frequency turns `beta_fast` and `beta_slow` times over the original context.
fn yarn_factors(
    dim: usize,
    theta: f32,
    factor: f32,
    original: usize,
    beta_fast: f32,
    beta_slow: f32,
    truncate: bool,
) -> Vec<f32> {
    let (d, base) = (dim as f64, f64::from(theta));
    let correction = |rotations: f32| {
        d * (original as f64 / (f64::from(rotations) * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001; // as transformers: no division by zero
    }
    (0..dim / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp; // weight of the unscaled frequency
            let scale = (1.0 - keep) / f64::from(factor) + keep;
            (1.0 / scale) as f32
        })
        .collect()
}
