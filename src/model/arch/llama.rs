//! Llama (and Mistral, its alias): RMSNorm, SwiGLU, RoPE over whole heads. llama.cpp's
//! converter permutes the q/k rows so that RoPE turns adjacent pairs (`convert_hf_to_gguf.py`
//! `LlamaModel.permute`); the families after it in this folder keep HF's row order.

use super::{
    Adapter, GgufNames, Rotary, Traits, ATTENTION, EMBEDDING, FFN_NORM, GATED_MLP, O_PROJ,
};
use crate::model::config::Activation;

pub struct Llama;

/// The base the other families' traits are written as differences from.
pub(super) const TRAITS: Traits = Traits {
    name: "llama",
    hf_model_type: "llama",
    hf_architecture: "LlamaForCausalLM",
    gguf_arch: "llama",
    hidden_act: Activation::Silu,
    hf_act_field: "hidden_act",
    rotary: Rotary::Full,
    use_qk_norm: false,
    qkv_bias: false,
    o_bias: false,
    fused_projections: false,
    phi_block: false,
    layer_norm: false,
    plain_mlp: false,
    learned_positions: false,
    sandwich_norms: false,
    scale_embeddings: false,
    gguf_permuted_qk: true,
    norm_offset: 0.0,
    hf_max_position_embeddings: 2048,
    hf_rope_theta: 10_000.0,
    hf_tie_word_embeddings: false,
    gguf_names: GgufNames {
        top: EMBEDDING,
        layer: &[ATTENTION, O_PROJ, FFN_NORM, GATED_MLP],
    },
};

impl Adapter for Llama {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }
}
