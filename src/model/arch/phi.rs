//! Phi (phi-1, phi-1.5, phi-2; llama.cpp's `phi2`): LayerNorm with biases, attention and a
//! plain GELU MLP side by side on one normalised input, biases everywhere, a biased head,
//! RoPE over the leading `partial_rotary_factor` of each head in HF's row order.

use super::{Adapter, GgufNames, JsonMap, Rotary, Traits, ATTENTION, PLAIN_MLP};
use crate::model::config::{Activation, ModelConfig};

pub struct Phi;

static TRAITS: Traits = Traits {
    name: "phi",
    hf_model_type: "phi",
    hf_architecture: "PhiForCausalLM",
    gguf_arch: "phi2",
    hidden_act: Activation::GeluPytorchTanh,
    rotary: Rotary::Partial { hf_default: 0.5 },
    qkv_bias: true,
    o_bias: true,
    phi_block: true,
    layer_norm: true,
    plain_mlp: true,
    gguf_permuted_qk: false,
    gguf_names: GgufNames {
        top: &[
            ("model.embed_tokens", "token_embd"),
            ("model.final_layernorm", "output_norm"),
            ("lm_head", "output"),
        ],
        layer: &[ATTENTION, &[("self_attn.dense", "attn_output")], PLAIN_MLP],
    },
    ..super::llama::TRAITS
};

impl Adapter for Phi {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn hf_config(&self, cfg: &ModelConfig, m: &mut JsonMap) {
        let factor = cfg.rotary_dim as f64 / cfg.head_dim as f64;
        m.insert("partial_rotary_factor".into(), factor.into());
    }
}
