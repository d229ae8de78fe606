//! Qwen 3: Qwen 2 without the q/k/v biases (unless `attention_bias`), with an RMSNorm over
//! each head of q and k before RoPE.

use super::{
    Adapter, GgufNames, Rotary, Traits, ATTENTION, EMBEDDING, FFN_NORM, GATED_MLP, O_PROJ, QK_NORM,
};
use crate::error::Result;
use crate::model::config::{Activation, HfFields, ModelConfig};

pub struct Qwen3;

static TRAITS: Traits = Traits {
    name: "qwen3",
    hf_model_type: "qwen3",
    hf_architecture: "Qwen3ForCausalLM",
    gguf_arch: "qwen3",
    hidden_act: Activation::Silu,
    hf_act_field: "hidden_act",
    rotary: Rotary::Full,
    use_qk_norm: true,
    qkv_bias: false,
    o_bias: false,
    fused_projections: false,
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
        layer: &[ATTENTION, QK_NORM, O_PROJ, FFN_NORM, GATED_MLP],
    },
};

impl Adapter for Qwen3 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn finish_hf(&self, f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
        super::qwen2::ignore_unused_window(f, cfg)
    }
}
