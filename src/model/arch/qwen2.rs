//! Qwen 2: the llama block with q/k/v biases, HF row order for RoPE, and a sliding window
//! that only `use_sliding_window` turns on (per layer, which the decoder does not run).

use super::{Adapter, Traits};
use crate::error::Result;
use crate::model::config::{HfFields, ModelConfig};

pub struct Qwen2;

static TRAITS: Traits = Traits {
    name: "qwen2",
    hf_model_type: "qwen2",
    hf_architecture: "Qwen2ForCausalLM",
    gguf_arch: "qwen2",
    qkv_bias: true,
    gguf_permuted_qk: false,
    ..super::llama::TRAITS
};

/// Qwen configs carry a `sliding_window` that applies only with `use_sliding_window`,
/// which is refused: the decoder does not run Qwen's per-layer windows.
pub(super) fn ignore_unused_window(f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
    if f.bool_or("use_sliding_window", false)? {
        return Err(crate::error::Error::config(
            "use_sliding_window",
            "Qwen's per-layer sliding window (max_window_layers) is not supported",
        ));
    }
    cfg.sliding_window = None;
    Ok(())
}

impl Adapter for Qwen2 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn finish_hf(&self, f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
        ignore_unused_window(f, cfg)
    }
}
