//! Qwen 3 MoE: Qwen 3 with top-k routed experts in every `decoder_sparse_step`-th layer
//! (dense MLPs in `mlp_only_layers`). Experts are stored stacked, `[experts, out, in]`, in
//! llama.cpp's files (`ffn_*_exps`) and mlx-lm's (`mlp.switch_mlp.*`); HF's per-expert
//! tensors are stacked by the converter.

use super::{
    Adapter, GgufNames, JsonMap, Traits, ATTENTION, EMBEDDING, FFN_NORM, GATED_MLP, O_PROJ, QK_NORM,
};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::config::{
    check_range, required, HfFields, ModelConfig, MoeConfig, MAX_HIDDEN, MAX_LAYERS,
};

pub struct Qwen3Moe;

static TRAITS: Traits = Traits {
    name: "qwen3_moe",
    hf_model_type: "qwen3_moe",
    hf_architecture: "Qwen3MoeForCausalLM",
    gguf_arch: "qwen3moe",
    use_qk_norm: true,
    gguf_permuted_qk: false,
    gguf_names: GgufNames {
        top: EMBEDDING,
        layer: &[
            ATTENTION,
            QK_NORM,
            O_PROJ,
            FFN_NORM,
            // The dense layers of `mlp_only_layers`.
            GATED_MLP,
            // The router, and every expert's projection stacked in one tensor.
            &[
                ("mlp.gate", "ffn_gate_inp"),
                ("mlp.switch_mlp.gate_proj", "ffn_gate_exps"),
                ("mlp.switch_mlp.up_proj", "ffn_up_exps"),
                ("mlp.switch_mlp.down_proj", "ffn_down_exps"),
            ],
        ],
    },
    ..super::llama::TRAITS
};

impl Adapter for Qwen3Moe {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    /// llama.cpp's `qwen3moe` keys; every layer is sparse and the chosen experts'
    /// weights are renormalised (`norm_topk_prob`), as llama.cpp runs it.
    fn finish_gguf(&self, g: &GgufFile, cfg: &mut ModelConfig) -> Result<()> {
        let count = "qwen3moe.expert_count";
        let num_experts = check_range(count, required(g, count)?, 4096)?;
        let used = "qwen3moe.expert_used_count";
        let width = "qwen3moe.expert_feed_forward_length";
        cfg.moe = Some(MoeConfig {
            num_experts,
            num_experts_per_tok: check_range(used, required(g, used)?, num_experts)?,
            moe_intermediate_size: check_range(width, required(g, width)?, 16 * MAX_HIDDEN)?,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        });
        Ok(())
    }

    fn finish_hf(&self, f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
        super::qwen2::ignore_unused_window(f, cfg)?;
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
        cfg.moe = Some(MoeConfig {
            num_experts,
            num_experts_per_tok,
            moe_intermediate_size: f.usize("moe_intermediate_size", 16 * MAX_HIDDEN)?,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            decoder_sparse_step: match f.opt_usize("decoder_sparse_step")? {
                Some(n) => check_range("decoder_sparse_step", n, MAX_LAYERS)?,
                None => 1,
            },
            mlp_only_layers,
        });
        Ok(())
    }

    fn hf_config(&self, cfg: &ModelConfig, m: &mut JsonMap) {
        let Some(moe) = &cfg.moe else { return };
        for (k, v) in [
            ("num_experts", serde_json::json!(moe.num_experts)),
            ("num_experts_per_tok", moe.num_experts_per_tok.into()),
            ("moe_intermediate_size", moe.moe_intermediate_size.into()),
            ("norm_topk_prob", moe.norm_topk_prob.into()),
            ("decoder_sparse_step", moe.decoder_sparse_step.into()),
            ("mlp_only_layers", moe.mlp_only_layers.clone().into()),
        ] {
            m.insert(k.into(), v);
        }
    }
}
