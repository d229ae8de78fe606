//! Phi 3: the llama block with q/k/v fused in `qkv_proj` and gate/up in `gate_up_proj`
//! (llama.cpp keeps the latter fused under `ffn_up`), HF row order for RoPE.

use super::{Adapter, GgufNames, Traits, ATTENTION, EMBEDDING, FFN_NORM, O_PROJ};

pub struct Phi3;

static TRAITS: Traits = Traits {
    name: "phi3",
    hf_model_type: "phi3",
    hf_architecture: "Phi3ForCausalLM",
    gguf_arch: "phi3",
    fused_projections: true,
    gguf_permuted_qk: false,
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
    ..super::llama::TRAITS
};

impl Adapter for Phi3 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }
}
