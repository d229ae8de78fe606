//! Model families: one [`Family`] per decoder variant, a registry that maps every name a
//! source may use for it onto one vocabulary (mlx-lm's `MODEL_REMAPPING`: `mistral` →
//! `llama`, `phi2` → `phi`, `qwen3moe` → `qwen3_moe`), and one adapter file per family
//! holding what is particular to it: its fixed features and config defaults ([`Traits`]),
//! the config fields only it has, from GGUF metadata and from `config.json` (and back, for
//! a model converted from GGUF), its weight names in llama.cpp's layout, and its
//! checkpoint quirks (mlx-lm's `sanitize`).
//!
//! The shared parsers (`model::config`), the loader, the weight sources and the converter
//! ask the adapter; no family name is written anywhere else. Adding a family is one file
//! here, its variant of [`Family`] with its arm in [`Family::adapter`], and its names in
//! [`REGISTRY`].

mod gemma3;
mod gpt2;
mod llama;
mod phi;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen3_moe;

use std::fmt;

use serde::{Serialize, Serializer};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::config::{Activation, HfFields, ModelConfig};

/// A `config.json` object.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// A decoder family. Its [`Family::name`] is the `model_type` Cortex reports whatever the
/// source (GGUF `general.architecture` or `config.json` `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Gemma3,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Phi3,
    Phi,
    Gpt2,
}

/// Every name a source may give a family, with the family it runs as. The order is the
/// order error messages list them in.
const REGISTRY: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    // llama.cpp writes Mistral as `llama`; transformers gives it its own config class.
    ("mistral", Family::Llama),
    ("gemma3_text", Family::Gemma3),
    ("gemma3", Family::Gemma3),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("qwen3_moe", Family::Qwen3Moe),
    ("qwen3moe", Family::Qwen3Moe),
    ("phi3", Family::Phi3),
    ("phi", Family::Phi),
    ("phi2", Family::Phi),
    ("gpt2", Family::Gpt2),
];

impl Family {
    /// The family a source's name (GGUF `general.architecture` or `config.json`
    /// `model_type`) stands for; `Error::UnsupportedArchitecture` listing the registry's
    /// names for any other.
    pub fn from_name(name: &str) -> Result<Family> {
        REGISTRY
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, f)| f)
            .ok_or_else(|| Error::UnsupportedArchitecture {
                architecture: name.to_string(),
                supported: REGISTRY.iter().map(|(n, _)| n.to_string()).collect(),
            })
    }

    /// The family's one name (its mlx-lm module name).
    pub fn name(self) -> &'static str {
        self.traits().name
    }

    /// The adapter holding what is particular to the family.
    pub fn adapter(self) -> &'static dyn Adapter {
        match self {
            Family::Llama => &llama::Llama,
            Family::Gemma3 => &gemma3::Gemma3,
            Family::Qwen2 => &qwen2::Qwen2,
            Family::Qwen3 => &qwen3::Qwen3,
            Family::Qwen3Moe => &qwen3_moe::Qwen3Moe,
            Family::Phi3 => &phi3::Phi3,
            Family::Phi => &phi::Phi,
            Family::Gpt2 => &gpt2::Gpt2,
        }
    }

    pub fn traits(self) -> &'static Traits {
        self.adapter().traits()
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Family {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Which leading dimensions of each head RoPE turns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rotary {
    /// All of them.
    Full,
    /// A fraction (HF `partial_rotary_factor`, this default when absent; GGUF
    /// `rope.dimension_count`).
    Partial { hf_default: f64 },
    /// None: positions are learned embeddings.
    None,
}

/// llama.cpp tensor names of HF module paths, as `(HF, llama.cpp)` pairs: whole-model
/// modules by full path, layer modules by their path inside `model.layers.{i}`.
pub struct GgufNames {
    pub top: &'static [(&'static str, &'static str)],
    pub layer: &'static [&'static [(&'static str, &'static str)]],
}

/// What a family fixes, and the defaults its `config.json` class gives absent fields.
/// Each family writes its own as differences from llama's (`..llama::TRAITS`), as the
/// model cards describe them ("the llama block with q/k/v biases").
pub struct Traits {
    /// The family's one name ([`Family::name`]).
    pub name: &'static str,
    /// `model_type` and `architectures[0]` of its transformers config.
    pub hf_model_type: &'static str,
    pub hf_architecture: &'static str,
    /// llama.cpp's `general.architecture` (the `{arch}.*` key prefix).
    pub gguf_arch: &'static str,
    /// The MLP activation (GGUF never stores it; `config.json`'s default).
    pub hidden_act: Activation,
    /// The `config.json` field naming the activation.
    pub hf_act_field: &'static str,
    pub rotary: Rotary,
    /// The decoder's switches (see [`ModelConfig`]'s fields of the same names).
    pub use_qk_norm: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub fused_projections: bool,
    pub phi_block: bool,
    pub layer_norm: bool,
    pub plain_mlp: bool,
    pub learned_positions: bool,
    pub sandwich_norms: bool,
    pub scale_embeddings: bool,
    /// llama.cpp's converter permutes this family's q/k rows (and biases) so that RoPE
    /// turns adjacent pairs; HF turns the two halves of each head.
    pub gguf_permuted_qk: bool,
    /// Norm weights are applied as `offset + w`: HF stores `w`, llama.cpp `offset + w`
    /// (Gemma: 1).
    pub norm_offset: f32,
    /// `config.json` defaults (transformers' config classes).
    pub hf_max_position_embeddings: usize,
    pub hf_rope_theta: f64,
    pub hf_tie_word_embeddings: bool,
    pub gguf_names: GgufNames,
}

/// How a checkpoint names the decoder's modules when its names differ from the
/// decoder's (GPT-2's `transformer.h.0.attn.c_attn`, stored `[in, out]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredLayout {
    pub family: Family,
    /// Prefix of every stored name.
    pub prefix: &'static str,
    /// Whether the checkpoint's projections are transposed Conv1D weights.
    pub transposed: bool,
}

impl StoredLayout {
    /// The stored module behind a decoder module name, and whether its weight is stored
    /// transposed; `None` when the family stores it under the decoder's name.
    pub fn stored(&self, module: &str) -> Option<(String, bool)> {
        self.family.adapter().stored_name(self, module)
    }
}

/// A tensor of a checkpoint under the name the MLX output gives it (mlx-lm's
/// `sanitize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub name: String,
    /// The checkpoint's name.
    pub stored: String,
    /// A 2-D weight stored `[in, out]`, to be read transposed.
    pub transposed: bool,
}

/// What is particular to one family; every method but [`Adapter::traits`] has the
/// default most families need.
pub trait Adapter: Sync {
    fn traits(&self) -> &'static Traits;

    /// `config.json` under the field names the shared parser reads, when the family's
    /// config class spells them otherwise (GPT-2's `n_embd`); refuses settings the decoder
    /// does not implement.
    fn hf_fields(&self, _map: &JsonMap) -> Result<Option<JsonMap>> {
        Ok(None)
    }

    /// Sets the fields only this family has from `config.json` (after the shared ones).
    fn finish_hf(&self, _f: &HfFields<'_>, _cfg: &mut ModelConfig) -> Result<()> {
        Ok(())
    }

    /// Sets the fields only this family has from GGUF metadata (after the shared ones).
    fn finish_gguf(&self, _g: &GgufFile, _cfg: &mut ModelConfig) -> Result<()> {
        Ok(())
    }

    /// Writes this family's own fields into the `config.json` of a model read from GGUF,
    /// so that [`ModelConfig::from_hf`] gives back the same configuration.
    fn hf_config(&self, _cfg: &ModelConfig, _m: &mut JsonMap) {}

    /// The layout of a checkpoint whose tensor names `has` answers for, when it names
    /// modules otherwise than the decoder.
    fn stored_layout(&self, _has: &dyn Fn(&str) -> bool) -> Option<StoredLayout> {
        None
    }

    /// mlx-lm's layout, when it names modules otherwise than the decoder.
    fn mlx_layout(&self) -> Option<StoredLayout> {
        None
    }

    /// See [`StoredLayout::stored`].
    fn stored_name(&self, _layout: &StoredLayout, _module: &str) -> Option<(String, bool)> {
        None
    }

    /// The tensors of a checkpoint (`names`) as the MLX output names them, dropping
    /// buffers and a tied head's copy; `None` when the names stay.
    fn sanitize(&self, _names: &[&str], _tied: bool) -> Option<Vec<Renamed>> {
        None
    }
}

/// `(HF, llama.cpp)` name tables the families compose theirs from.
pub(crate) const EMBEDDING: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];
pub(crate) const ATTENTION: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
];
pub(crate) const O_PROJ: &[(&str, &str)] = &[("self_attn.o_proj", "attn_output")];
pub(crate) const QK_NORM: &[(&str, &str)] = &[
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];
/// The llama family's one norm before the MLP is HF's `post_attention_layernorm`.
pub(crate) const FFN_NORM: &[(&str, &str)] = &[("post_attention_layernorm", "ffn_norm")];
pub(crate) const GATED_MLP: &[(&str, &str)] = &[
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];
pub(crate) const PLAIN_MLP: &[(&str, &str)] = &[("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down")];

impl Traits {
    /// llama.cpp's tensor name for an HF module path (without `.weight`), `None` when the
    /// family has no such module.
    pub fn gguf_name(&self, module: &str) -> Option<String> {
        let names = &self.gguf_names;
        if let Some(&(_, g)) = names.top.iter().find(|(hf, _)| *hf == module) {
            return Some(g.to_string());
        }
        let (layer, leaf) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, g) = names
            .layer
            .iter()
            .copied()
            .flatten()
            .find(|(hf, _)| *hf == leaf)?;
        Some(format!("blk.{layer}.{g}"))
    }

    /// The HF module path of a llama.cpp module name (`blk.0.attn_q`), the inverse of
    /// [`Traits::gguf_name`]; `None` for a name the family lacks or past the last layer.
    pub fn hf_module(&self, gguf: &str, num_layers: usize) -> Option<String> {
        let names = &self.gguf_names;
        if let Some(&(hf, _)) = names.top.iter().find(|(_, g)| *g == gguf) {
            return Some(hf.to_string());
        }
        let (layer, leaf) = gguf.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok().filter(|&l| l < num_layers)?;
        let (hf, _) = names
            .layer
            .iter()
            .copied()
            .flatten()
            .find(|(_, g)| *g == leaf)?;
        Some(format!("model.layers.{layer}.{hf}"))
    }
}

/// The HF `config.json` of a model read from GGUF metadata: the shared fields, then the
/// family's own ([`Adapter::hf_config`]).
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    use serde_json::json;
    let t = cfg.model_type.traits();
    let act = match cfg.hidden_act {
        Activation::Silu => "silu",
        Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
    };
    let eps_field = if t.layer_norm {
        "layer_norm_eps"
    } else {
        "rms_norm_eps"
    };
    let mut m = JsonMap::new();
    for (k, v) in [
        ("architectures", json!([t.hf_architecture])),
        ("model_type", json!(t.hf_model_type)),
        ("hidden_size", json!(cfg.hidden_size)),
        ("intermediate_size", json!(cfg.intermediate_size)),
        ("num_hidden_layers", json!(cfg.num_hidden_layers)),
        ("num_attention_heads", json!(cfg.num_attention_heads)),
        ("num_key_value_heads", json!(cfg.num_key_value_heads)),
        ("head_dim", json!(cfg.head_dim)),
        ("vocab_size", json!(cfg.vocab_size)),
        (
            "max_position_embeddings",
            json!(cfg.max_position_embeddings),
        ),
        (eps_field, json!(cfg.rms_norm_eps)),
        ("rope_theta", json!(cfg.rope_theta)),
        ("tie_word_embeddings", json!(cfg.tie_word_embeddings)),
        (t.hf_act_field, json!(act)),
        ("torch_dtype", json!("float16")),
    ] {
        m.insert(k.to_string(), v);
    }
    if let Some(crate::model::config::RopeScaling::Linear { factor }) = cfg.rope_scaling {
        m.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": factor}),
        );
    }
    cfg.model_type.adapter().hf_config(cfg, &mut m);
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Family; 8] = [
        Family::Llama,
        Family::Gemma3,
        Family::Qwen2,
        Family::Qwen3,
        Family::Qwen3Moe,
        Family::Phi3,
        Family::Phi,
        Family::Gpt2,
    ];

    #[test]
    fn every_name_of_a_family_resolves_to_it() -> Result<()> {
        for f in ALL {
            let t = f.traits();
            assert_eq!(t.name, f.name());
            for name in [t.name, t.hf_model_type, t.gguf_arch] {
                assert_eq!(Family::from_name(name)?, f, "{name}");
            }
        }
        assert_eq!(Family::from_name("mistral")?, Family::Llama);
        Ok(())
    }

    #[test]
    fn an_unknown_name_lists_the_registry() {
        match Family::from_name("transmogrifier") {
            Err(Error::UnsupportedArchitecture {
                architecture,
                supported,
            }) => {
                assert_eq!(architecture, "transmogrifier");
                let names: Vec<&str> = REGISTRY.iter().map(|(n, _)| *n).collect();
                assert_eq!(supported, names);
            }
            other => panic!("expected UnsupportedArchitecture, got {other:?}"),
        }
    }

    #[test]
    fn gguf_names_invert_for_every_family() {
        for f in ALL {
            let t = f.traits();
            for &(hf, g) in t.gguf_names.top {
                assert_eq!(t.gguf_name(hf).as_deref(), Some(g), "{f} {hf}");
                assert_eq!(t.hf_module(g, 2).as_deref(), Some(hf), "{f} {g}");
            }
            for &(leaf, g) in t.gguf_names.layer.iter().copied().flatten() {
                let hf = format!("model.layers.1.{leaf}");
                let gguf = format!("blk.1.{g}");
                assert_eq!(t.gguf_name(&hf), Some(gguf.clone()), "{f} {hf}");
                assert_eq!(t.hf_module(&gguf, 2), Some(hf), "{f} {gguf}");
                // Past the last layer, no module.
                assert_eq!(t.hf_module(&gguf, 1), None, "{f} {gguf}");
            }
        }
    }

    #[test]
    fn names_that_differ_between_families() {
        let name = |f: Family, m: &str| f.traits().gguf_name(m);
        let post = "model.layers.0.post_attention_layernorm";
        assert_eq!(name(Family::Llama, post).as_deref(), Some("blk.0.ffn_norm"));
        assert_eq!(
            name(Family::Gemma3, post).as_deref(),
            Some("blk.0.post_attention_norm")
        );
        let out = "model.layers.0.self_attn.dense";
        assert_eq!(name(Family::Phi, out).as_deref(), Some("blk.0.attn_output"));
        assert_eq!(name(Family::Llama, out), None);
        assert_eq!(
            name(Family::Phi, "model.final_layernorm").as_deref(),
            Some("output_norm")
        );
        assert_eq!(
            name(Family::Phi3, "model.layers.2.mlp.gate_up_proj").as_deref(),
            Some("blk.2.ffn_up")
        );
        assert_eq!(
            name(Family::Qwen3Moe, "model.layers.0.mlp.switch_mlp.up_proj").as_deref(),
            Some("blk.0.ffn_up_exps")
        );
        assert_eq!(
            name(Family::Gpt2, "model.embed_positions").as_deref(),
            Some("position_embd")
        );
    }

    #[test]
    fn gpt2_layouts_and_sanitize() {
        let hf = [
            "transformer.wte.weight",
            "transformer.h.0.attn.c_attn.weight",
        ];
        let a = Family::Gpt2.adapter();
        let layout = a.stored_layout(&|n| hf.contains(&n));
        let qkv = "model.layers.0.self_attn.qkv_proj";
        // `GPT2LMHeadModel`: Conv1D weights stored `[in, out]`.
        assert_eq!(
            layout.and_then(|l| l.stored(qkv)),
            Some(("transformer.h.0.attn.c_attn".to_string(), true))
        );
        let norm = layout.and_then(|l| l.stored("model.layers.0.input_layernorm"));
        assert_eq!(norm, Some(("transformer.h.0.ln_1".to_string(), false)));
        // mlx-lm's: under `model.`, already `[out, in]`.
        let mlx = a.mlx_layout().and_then(|l| l.stored(qkv));
        assert_eq!(mlx, Some(("model.h.0.attn.c_attn".to_string(), false)));
        assert_eq!(Family::Llama.adapter().stored_layout(&|_| true), None);

        let names = [
            "transformer.wte.weight",
            "transformer.h.0.attn.bias",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_attn.bias",
            "lm_head.weight",
        ];
        let renamed = a.sanitize(&names, true).unwrap_or_default();
        let got: Vec<(&str, bool)> = renamed
            .iter()
            .map(|r| (r.name.as_str(), r.transposed))
            .collect();
        assert_eq!(
            got,
            [
                ("model.wte.weight", false),
                ("model.h.0.attn.c_attn.weight", true),
                ("model.h.0.attn.c_attn.bias", false),
            ]
        );
        // Already mlx-lm's layout: nothing to rename.
        assert_eq!(a.sanitize(&["model.wte.weight"], true), None);
    }
}
