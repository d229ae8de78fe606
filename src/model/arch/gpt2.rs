//! GPT-2: learned absolute positions and no RoPE, LayerNorm with biases, fused q/k/v,
//! a plain GELU MLP, biases everywhere, a head tied to the embeddings. Its checkpoints
//! name modules their own way: `GPT2LMHeadModel` saves `transformer.h.0.attn.c_attn` with
//! Conv1D weights `[in, out]` and causal-mask buffers; mlx-lm's `sanitize` renames them
//! `model.h.0.attn.c_attn`, `[out, in]`, without buffers. Config fields are `GPT2Config`'s
//! (`n_embd`...).

use super::{Adapter, GgufNames, JsonMap, Renamed, Rotary, StoredLayout, Traits, PLAIN_MLP};
use crate::error::{Error, Result};
use crate::model::arch::Family;
use crate::model::config::{Activation, HfFields, ModelConfig, MAX_HIDDEN};

pub struct Gpt2;

static TRAITS: Traits = Traits {
    name: "gpt2",
    hf_model_type: "gpt2",
    hf_architecture: "GPT2LMHeadModel",
    gguf_arch: "gpt2",
    hidden_act: Activation::GeluPytorchTanh,
    rotary: Rotary::None,
    qkv_bias: true,
    o_bias: true,
    fused_projections: true,
    layer_norm: true,
    plain_mlp: true,
    learned_positions: true,
    gguf_permuted_qk: false,
    hf_max_position_embeddings: 1024,
    hf_tie_word_embeddings: true,
    gguf_names: GgufNames {
        top: &[
            ("model.embed_tokens", "token_embd"),
            ("model.embed_positions", "position_embd"),
            ("model.norm", "output_norm"),
            ("lm_head", "output"),
        ],
        layer: &[
            &[
                ("input_layernorm", "attn_norm"),
                ("self_attn.qkv_proj", "attn_qkv"),
                ("self_attn.o_proj", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"),
            ],
            PLAIN_MLP,
        ],
    },
    ..super::llama::TRAITS
};

/// `GPT2Config`'s names for the fields the other families share.
const FIELDS: &[(&str, &str)] = &[
    ("n_embd", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("n_head", "num_attention_heads"),
    ("n_positions", "max_position_embeddings"),
    ("n_inner", "intermediate_size"),
    ("layer_norm_epsilon", "layer_norm_eps"),
    ("activation_function", "hidden_act"),
];

/// A layer's modules: the decoder's name, GPT-2's, and whether it is a Conv1D.
const LAYER_MODULES: &[(&str, &str, bool)] = &[
    ("input_layernorm", "ln_1", false),
    ("post_attention_layernorm", "ln_2", false),
    ("self_attn.qkv_proj", "attn.c_attn", true),
    ("self_attn.o_proj", "attn.c_proj", true),
    ("mlp.fc1", "mlp.c_fc", true),
    ("mlp.fc2", "mlp.c_proj", true),
];

/// Whether a stored parameter is one of the Conv1D weights.
fn is_conv1d_weight(name: &str) -> bool {
    LAYER_MODULES.iter().any(|&(_, theirs, conv)| {
        conv && name
            .strip_suffix(".weight")
            .is_some_and(|m| m.ends_with(theirs))
    })
}

impl Adapter for Gpt2 {
    fn traits(&self) -> &'static Traits {
        &TRAITS
    }

    fn hf_fields(&self, map: &JsonMap) -> Result<Option<JsonMap>> {
        let f = HfFields(map);
        if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
            return Err(Error::config(
                "scale_attn_by_inverse_layer_idx",
                "per-layer attention scaling is not supported",
            ));
        }
        if !f.bool_or("scale_attn_weights", true)? {
            return Err(Error::config(
                "scale_attn_weights",
                "attention without 1/sqrt(head_dim) scaling is not supported",
            ));
        }
        let mut out = map.clone();
        for (theirs, ours) in FIELDS {
            if let Some(v) = map.get(*theirs) {
                out.insert(ours.to_string(), v.clone());
            }
        }
        // `n_inner: null` means four times the width.
        if out
            .get("intermediate_size")
            .is_none_or(serde_json::Value::is_null)
        {
            let d = f.usize("n_embd", MAX_HIDDEN)?;
            out.insert("intermediate_size".into(), (4 * d).into());
        }
        Ok(Some(out))
    }

    fn hf_config(&self, cfg: &ModelConfig, m: &mut JsonMap) {
        for (theirs, ours) in FIELDS {
            if let Some(v) = m.remove(*ours) {
                m.insert(theirs.to_string(), v);
            }
        }
        for unused in ["num_key_value_heads", "head_dim", "rope_theta"] {
            m.remove(unused);
        }
        m.insert("n_ctx".into(), cfg.max_position_embeddings.into());
        m.insert("activation_function".into(), "gelu_new".into());
    }

    fn stored_layout(&self, has: &dyn Fn(&str) -> bool) -> Option<StoredLayout> {
        ["transformer.", "", "model."]
            .into_iter()
            .find(|p| has(&format!("{p}wte.weight")))
            .map(|prefix| StoredLayout {
                family: Family::Gpt2,
                prefix,
                transposed: prefix != "model.",
            })
    }

    fn mlx_layout(&self) -> Option<StoredLayout> {
        Some(StoredLayout {
            family: Family::Gpt2,
            prefix: "model.",
            transposed: false,
        })
    }

    fn stored_name(&self, layout: &StoredLayout, module: &str) -> Option<(String, bool)> {
        let p = layout.prefix;
        let top = match module {
            "model.embed_tokens" => Some("wte"),
            "model.embed_positions" => Some("wpe"),
            "model.norm" => Some("ln_f"),
            _ => None,
        };
        if let Some(top) = top {
            return Some((format!("{p}{top}"), false));
        }
        let (layer, leaf) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let &(_, name, conv) = LAYER_MODULES.iter().find(|(ours, ..)| *ours == leaf)?;
        Some((format!("{p}h.{layer}.{name}"), conv && layout.transposed))
    }

    /// mlx-lm's GPT-2 `sanitize`: every name under `model.`, Conv1D weights `[out, in]`,
    /// no causal-mask buffers and no copy of a tied head.
    fn sanitize(&self, names: &[&str], tied: bool) -> Option<Vec<Renamed>> {
        let layout = self
            .stored_layout(&|n| names.contains(&n))
            .filter(|l| l.transposed)?;
        // Buffers some checkpoints carry that are not parameters (the causal mask), and the
        // copy of a tied head.
        let dropped = |n: &str| {
            n.ends_with(".attn.bias")
                || n.ends_with(".attn.masked_bias")
                || (tied && n == "lm_head.weight")
        };
        Some(
            names
                .iter()
                .filter(|n| !dropped(n))
                .map(|n| Renamed {
                    name: format!("model.{}", n.strip_prefix(layout.prefix).unwrap_or(n)),
                    stored: n.to_string(),
                    transposed: is_conv1d_weight(n),
                })
                .collect(),
        )
    }
}
