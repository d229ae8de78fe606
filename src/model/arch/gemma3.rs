//! Gemma 3 (text): GeGLU, scaled embeddings, q/k norms and sandwich norms, norm weights
//! applied as `1 + w` (llama.cpp stores them so), sliding-window attention on five layers
//! of six with their own RoPE base, and scores scaled by `query_pre_attn_scalar`.

use super::{
    Adapter, GgufNames, JsonMap, Traits, ATTENTION, EMBEDDING, GATED_MLP, O_PROJ, QK_NORM,
};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::config::{
    check_range, check_rope_base, required, Activation, HfFields, ModelConfig, MAX_CONTEXT,
    MAX_LAYERS,
};

pub struct Gemma3;

static TRAITS: Traits = Traits {
    name: "gemma3",
    hf_model_type: "gemma3_text",
    hf_architecture: "Gemma3ForCausalLM",
    gguf_arch: "gemma3",
    hidden_act: Activation::GeluPytorchTanh,
    hf_act_field: "hidden_activation",
    use_qk_norm: true,
    sandwich_norms: true,
    scale_embeddings: true,
    gguf_permuted_qk: false,
    norm_offset: 1.0,
    hf_max_position_embeddings: 131_072,
    hf_rope_theta: 1_000_000.0,
    hf_tie_word_embeddings: true,
    gguf_names: GgufNames {
        top: EMBEDDING,
        layer: &[
            ATTENTION,
            QK_NORM,
            O_PROJ,
            // HF's `post_attention_layernorm` is a sandwich norm; the pre-MLP one is
            // `pre_feedforward_layernorm`.
            &[
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
            ],
            GATED_MLP,
        ],
    },
    ..super::llama::TRAITS
};

impl Adapter for Gemma3 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    /// `gemma3` in config.json is the multimodal model (`Gemma3ForConditionalGeneration`),
    /// whose decoder settings sit in `text_config` and weights under `language_model.`.
    fn hf_fields(&self, map: &JsonMap) -> Result<Option<JsonMap>> {
        if map.contains_key("text_config") {
            return Err(Error::config(
                "text_config",
                "multimodal Gemma 3 checkpoints are not supported (supported: gemma3_text)",
            ));
        }
        Ok(None)
    }

    fn finish_gguf(&self, g: &GgufFile, cfg: &mut ModelConfig) -> Result<()> {
        let key = "gemma3.attention.sliding_window";
        cfg.sliding_window = Some(check_range(key, required(g, key)?, MAX_CONTEXT)?);
        // llama.cpp (`llama-model.cpp`): Gemma 3 27B (62 layers) scales by hidden/heads,
        // the other sizes by the head dimension.
        if cfg.num_hidden_layers == 62 {
            cfg.query_pre_attn_scalar = (cfg.hidden_size / cfg.num_attention_heads) as f64;
        }
        // Fixed by the architecture (HF `sliding_window_pattern`, llama.cpp
        // `n_swa_pattern`; not stored in GGUF), as is the local RoPE base.
        cfg.sliding_window_pattern = Some(6);
        cfg.rope_local_base_freq = Some(10_000.0);
        Ok(())
    }

    fn finish_hf(&self, f: &HfFields<'_>, cfg: &mut ModelConfig) -> Result<()> {
        cfg.sliding_window = Some(cfg.sliding_window.unwrap_or(4096));
        cfg.sliding_window_pattern = Some(match f.opt_usize("sliding_window_pattern")? {
            // The loader takes each layer's index modulo the pattern.
            Some(n) => check_range("sliding_window_pattern", n, MAX_LAYERS)?,
            None => match f.0.get("layer_types") {
                None | Some(serde_json::Value::Null) => 6,
                Some(v) => pattern_of_layer_types(v, cfg.num_hidden_layers)?,
            },
        });
        cfg.query_pre_attn_scalar = f.f64_or("query_pre_attn_scalar", 256.0)?;
        let base = f.f64_or("rope_local_base_freq", 10_000.0)?;
        check_rope_base("rope_local_base_freq", base)?;
        cfg.rope_local_base_freq = Some(base as f32);
        Ok(())
    }

    fn hf_config(&self, cfg: &ModelConfig, m: &mut JsonMap) {
        use serde_json::json;
        m.insert(
            "query_pre_attn_scalar".into(),
            json!(cfg.query_pre_attn_scalar),
        );
        m.insert("sliding_window".into(), json!(cfg.sliding_window));
        m.insert(
            "sliding_window_pattern".into(),
            json!(cfg.sliding_window_pattern),
        );
        m.insert(
            "rope_local_base_freq".into(),
            json!(cfg.rope_local_base_freq),
        );
    }
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
