//! Decoder configuration with Hugging Face field names (`num_key_value_heads`,
//! `rope_theta`...), read from GGUF metadata (llama.cpp's `{arch}.*` keys, as written by
//! `convert_hf_to_gguf.py`) here and from `config.json` in [`hf`]. The shared fields are
//! parsed once for every family; the family's adapter (`model::arch`) supplies its fixed
//! features, its defaults and the fields only it has. Every size is range-checked here,
//! before anything is allocated from it, and checked again against the tensors' real
//! shapes at load.

mod hf;
mod rope;

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;

pub use hf::HfFields;
pub(crate) use rope::check_rope_base;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::arch::{Family, Rotary, Traits};

/// Upper bounds that no real model reaches; a config past them is corrupt or hostile.
pub(crate) const MAX_LAYERS: usize = 1024;
pub(crate) const MAX_HEADS: usize = 1024;
pub(crate) const MAX_CONTEXT: usize = 1 << 24;
pub(crate) const MAX_VOCAB: usize = 1 << 24;
pub(crate) const MAX_HIDDEN: usize = 1 << 17;

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
    /// The family, under its one name whatever the source called it.
    pub model_type: Family,
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

pub(crate) fn meta_f64(g: &GgufFile, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => as_f64(v)
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| Error::config(key, format!("expected a finite number, got {v:?}"))),
    }
}

pub(crate) fn required(g: &GgufFile, key: &str) -> Result<usize> {
    meta_usize(g, key)?.ok_or_else(|| Error::config(key, "missing from the GGUF metadata"))
}

pub(crate) fn check_range(field: &str, value: usize, max: usize) -> Result<usize> {
    if value == 0 || value > max {
        return Err(Error::config(
            field,
            format!("{value} is outside 1..={max}"),
        ));
    }
    Ok(value)
}

impl ModelConfig {
    /// The configuration with the shared fields given and every feature switch as the
    /// family fixes it; the family-only fields (sliding window, experts) left unset for
    /// its adapter.
    fn with_traits(t: &Traits, family: Family, shared: Shared) -> Self {
        ModelConfig {
            model_type: family,
            hidden_size: shared.hidden_size,
            intermediate_size: shared.intermediate_size,
            num_hidden_layers: shared.num_hidden_layers,
            num_attention_heads: shared.num_attention_heads,
            num_key_value_heads: shared.num_key_value_heads,
            head_dim: shared.head_dim,
            vocab_size: shared.vocab_size,
            max_position_embeddings: shared.max_position_embeddings,
            rms_norm_eps: shared.rms_norm_eps,
            rope_theta: shared.rope_theta as f32,
            rope_scaling: shared.rope_scaling,
            tie_word_embeddings: shared.tie_word_embeddings,
            hidden_act: shared.hidden_act,
            query_pre_attn_scalar: shared.head_dim as f64,
            use_qk_norm: t.use_qk_norm,
            qkv_bias: t.qkv_bias,
            o_bias: t.o_bias,
            mlp_bias: false,
            fused_projections: t.fused_projections,
            moe: None,
            phi_block: t.phi_block,
            layer_norm: t.layer_norm,
            plain_mlp: t.plain_mlp,
            learned_positions: t.learned_positions,
            rotary_dim: shared.rotary_dim,
            sandwich_norms: t.sandwich_norms,
            scale_embeddings: t.scale_embeddings,
            rope_interleaved: false,
            sliding_window: None,
            sliding_window_pattern: None,
            rope_local_base_freq: None,
        }
    }

    /// Builds the configuration from GGUF metadata (`general.architecture`, any name of
    /// the registry, and the `{arch}.*` keys).
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
        let family = Family::from_name(&arch)?;
        let t = family.traits();
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
        let head_dim = if let Some(d) = meta_usize(g, &k("attention.key_length"))? {
            d
        } else {
            if hidden_size % num_attention_heads != 0 {
                return Err(Error::config(
                    k("attention.head_count"),
                    format!("embedding_length {hidden_size} is not divisible by {num_attention_heads} heads"),
                ));
            }
            hidden_size / num_attention_heads
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(Error::config(
                k("attention.key_length"),
                format!("head dim {head_dim} must be even and in 2..=1024"),
            ));
        }
        let rot_key = k("rope.dimension_count");
        let rotary_dim = match (t.rotary, meta_usize(g, &rot_key)?) {
            (Rotary::None, _) => 0,
            (Rotary::Partial { .. }, Some(rot))
                if rot > 0 && rot <= head_dim && rot % 2 == 0 =>
            {
                rot
            }
            (Rotary::Partial { .. }, Some(rot)) => {
                return Err(Error::config(
                    rot_key,
                    format!("{rot} is not an even number of dimensions up to {head_dim}"),
                ))
            }
            (Rotary::Full, Some(rot)) if rot != head_dim => {
                return Err(Error::config(
                    rot_key,
                    format!("partial rotary embeddings ({rot} of {head_dim} dims) are not supported for {arch}"),
                ))
            }
            _ => head_dim,
        };
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
        let eps_key = if t.layer_norm {
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
        let shared = Shared {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling: RopeScaling::from_gguf(g, &arch)?,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            hidden_act: t.hidden_act,
            rotary_dim,
        };
        let mut cfg = Self::with_traits(t, family, shared);
        // Only llama.cpp's llama converter permutes q/k for adjacent-pair RoPE.
        cfg.rope_interleaved = t.gguf_permuted_qk;
        family.adapter().finish_gguf(g, &mut cfg)?;
        Ok(cfg)
    }
}

/// The fields every family reads the same way, parsed before the family's own.
struct Shared {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Option<RopeScaling>,
    tie_word_embeddings: bool,
    hidden_act: Activation,
    rotary_dim: usize,
}

#[cfg(test)]
mod tests;
