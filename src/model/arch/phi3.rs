//! Phi 3: the llama block with q/k/v fused in `qkv_proj` and gate/up in `gate_up_proj`
//! (llama.cpp keeps the latter fused under `ffn_up`), HF row order for RoPE.

use super::{Adapter, GgufNames, Rotary, Traits, ATTENTION, EMBEDDING, FFN_NORM, O_PROJ};
use crate::model::config::Activation;

pub struct Phi3;

static TRAITS: Traits = Traits {
    name: "phi3",
    hf_model_type: "phi3",
    hf_architecture: "Phi3ForCausalLM",
    gguf_arch: "phi3",
    hidden_act: Activation::Silu,
    hf_act_field: "hidden_act",
    rotary: Rotary::Full,
    use_qk_norm: false,
    qkv_bias: false,
    o_bias: false,
    fused_projections: true,
    phi_block: false,
    layer_norm: false,
    plain_mlp: false,
    learned_positions: false,
    sandwich_norms: false,
    scale_embeddings: false,
    gguf_permuted_qk: false,
    norm_offset: 0.0,
    hf_max_position_embeddings: 2048,
    hf_rope_theta: 10_000.0,
    hf_tie_word_embeddings: false,
    gguf_names: GgufNames {
        top: EMBEDDING,
        layer: &[
            ATTENTION,
            O_PROJ,
            FFN_NORM,
            &[
                ("self_attn.qkv_proj", "attn_qkv"),
                ("mlp.gate_up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ],
        ],
    },
};

impl Adapter for Phi3 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }
}
