//! Qwen 3: Qwen 2 without the q/k/v biases (unless `attention_bias`), with an RMSNorm over
//! each head of q and k before RoPE.

use super::{
    Adapter, GgufNames, Traits, ATTENTION, EMBEDDING, FFN_NORM, GATED_MLP, O_PROJ, QK_NORM,
};
use crate::error::Result;
use crate::model::config::{HfFields, ModelConfig};

pub struct Qwen3;

static TRAITS: Traits = Traits {
    name: "qwen3",
    hf_model_type: "qwen3",
    hf_architecture: "Qwen3ForCausalLM",
    gguf_arch: "qwen3",
    use_qk_norm: true,
    gguf_permuted_qk: false,
    gguf_names: GgufNames {
        top: EMBEDDING,
        layer: &[ATTENTION, QK_NORM, O_PROJ, FFN_NORM, GATED_MLP],
    },
    ..super::llama::TRAITS
};

impl Adapter for Qwen3 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn finish_hf(&self, f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
        super::qwen2::ignore_unused_window(f, cfg)
    }
}
