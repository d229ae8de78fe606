//! Decoder configuration from a Hugging Face `config.json`: transformers 5.x spellings
//! mapped onto the 4.x ones, `model_type` resolved through the family registry, the
//! shared fields parsed with the defaults of the family's config class, then the family's
//! own fields read by its adapter. Every error names the field as the file spells it.

use super::{check_range, Activation, ModelConfig, RopeScaling, Shared};
use super::{MAX_CONTEXT, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB};
use crate::error::{Error, Result};
use crate::model::arch::{Family, Rotary};
use crate::model::config::check_rope_base;

/// Typed access to `config.json` fields; every error names the field.
pub struct HfFields<'a>(pub(crate) &'a serde_json::Map<String, serde_json::Value>);

impl HfFields<'_> {
    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::config(field, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    pub(crate) fn usize(&self, field: &str, max: usize) -> Result<usize> {
        let v = self
            .opt_usize(field)?
            .ok_or_else(|| Error::config(field, "missing from config.json"))?;
        check_range(field, v, max)
    }

    pub(crate) fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| Error::config(field, format!("expected a finite number, got {v}"))),
        }
    }

    pub(crate) fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::config(field, format!("expected true or false, got {v}"))),
        }
    }

    pub(crate) fn str_or<'b>(&'b self, field: &str, default: &'b str) -> Result<&'b str> {
        match self.0.get(field) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::config(field, format!("expected a string, got {v}"))),
        }
    }
}

/// Field names of 4.x `config.json`s whose 5.x spelling differs, with the 5.x path.
type Spellings = Vec<(String, String)>;

/// `map` with the transformers 5.x spellings also written under their 4.x names (which
/// the rest of [`ModelConfig::from_hf`] reads), and which fields were moved:
/// * `num_local_experts` (5.x `Qwen3MoeConfig`'s attribute for `num_experts`);
/// * `rope_parameters` (5.x's one place for RoPE): its `rope_theta` and
///   `partial_rotary_factor`, and the rest as `rope_scaling`; or, keyed by layer type
///   (Gemma 3), `full_attention`'s as those and `sliding_attention`'s `rope_theta` as
///   `rope_local_base_freq`.
///
/// As transformers' `convert_rope_params_to_dict`, a 4.x `rope_scaling` object present
/// beside `rope_parameters` wins, and `rope_parameters`' `rope_theta` wins over the
/// top-level one.
fn v4_spellings(
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<(serde_json::Map<String, serde_json::Value>, Spellings)> {
    use serde_json::Value as J;
    let mut out = map.clone();
    let mut spelled = Spellings::new();
    let mut set = |out: &mut serde_json::Map<String, J>, v4: &str, v5: String, v: J| {
        out.insert(v4.to_string(), v);
        spelled.push((v4.to_string(), v5));
    };
    if let (None | Some(J::Null), Some(n)) = (map.get("num_experts"), map.get("num_local_experts"))
    {
        set(
            &mut out,
            "num_experts",
            "num_local_experts".into(),
            n.clone(),
        );
    }
    let Some(params) = map.get("rope_parameters").filter(|v| !v.is_null()) else {
        return Ok((out, spelled));
    };
    let object = |v: &J, field: &str| {
        v.as_object()
            .cloned()
            .ok_or_else(|| Error::config(field, format!("expected an object, got {v}")))
    };
    let params = object(params, "rope_parameters")?;
    let per_layer = !params.is_empty()
        && params
            .keys()
            .all(|k| matches!(k.as_str(), "full_attention" | "sliding_attention"));
    let (mut full, full_field) = match params.get("full_attention") {
        Some(v) if per_layer => (
            object(v, "rope_parameters.full_attention")?,
            "rope_parameters.full_attention",
        ),
        _ if per_layer => (serde_json::Map::new(), "rope_parameters.full_attention"),
        _ => (params.clone(), "rope_parameters"),
    };
    for key in ["rope_theta", "partial_rotary_factor"] {
        if let Some(v) = full.remove(key) {
            set(&mut out, key, format!("{full_field}.{key}"), v);
        }
    }
    let legacy_scaling = map
        .get("rope_scaling")
        .and_then(|v| v.as_object())
        .is_some_and(|o| !o.is_empty());
    if !legacy_scaling {
        if !full.contains_key("rope_type") && !full.contains_key("type") {
            full.insert("rope_type".into(), "default".into());
        }
        set(&mut out, "rope_scaling", full_field.into(), J::Object(full));
    }
    if let Some(v) = params.get("sliding_attention").filter(|_| per_layer) {
        let field = "rope_parameters.sliding_attention";
        let mut local = object(v, field)?;
        let ty = local.get("rope_type").or_else(|| local.get("type"));
        if ty.is_some_and(|t| t.as_str() != Some("default")) {
            return Err(Error::config(
                format!("{field}.rope_type"),
                format!(
                    "{} is not supported on local layers (supported: default)",
                    ty.unwrap_or(&J::Null)
                ),
            ));
        }
        if let Some(theta) = local.remove("rope_theta") {
            set(
                &mut out,
                "rope_local_base_freq",
                format!("{field}.rope_theta"),
                theta,
            );
        }
    }
    Ok((out, spelled))
}

impl ModelConfig {
    /// Builds the configuration from a Hugging Face `config.json` (already parsed), its
    /// `model_type` any name of the family registry. Defaults are those of the
    /// transformers config classes.
    pub fn from_hf(json: &serde_json::Value) -> Result<Self> {
        let map = json
            .as_object()
            .ok_or_else(|| Error::config("config.json", "expected a JSON object"))?;
        let fields = HfFields(map);
        let model_type = fields.str_or("model_type", "")?;
        let family = if model_type.is_empty() {
            Family::from_name("(config.json has no model_type)")?
        } else {
            Family::from_name(model_type)?
        };
        let renamed = family.adapter().hf_fields(map)?;
        let (map, spelled) = v4_spellings(renamed.as_ref().unwrap_or(map))?;
        // Errors name the field as this file spells it.
        Self::from_hf_fields(family, &map).map_err(|e| match e {
            Error::Config { field, message } => {
                let field = spelled
                    .iter()
                    .find_map(|(v4, theirs)| {
                        let rest = field.strip_prefix(v4.as_str())?;
                        (rest.is_empty() || rest.starts_with('.'))
                            .then(|| format!("{theirs}{rest}"))
                    })
                    .unwrap_or(field);
                Error::Config { field, message }
            }
            other => other,
        })
    }

    /// [`Self::from_hf`] on the 4.x spellings.
    fn from_hf_fields(
        family: Family,
        map: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let t = family.traits();
        let f = HfFields(map);
        let hidden_size = f.usize("hidden_size", MAX_HIDDEN)?;
        let intermediate_size = f.usize("intermediate_size", 16 * MAX_HIDDEN)?;
        let num_hidden_layers = f.usize("num_hidden_layers", MAX_LAYERS)?;
        let num_attention_heads = f.usize("num_attention_heads", MAX_HEADS)?;
        let num_key_value_heads = match f.opt_usize("num_key_value_heads")? {
            Some(n) => check_range("num_key_value_heads", n, num_attention_heads)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{num_key_value_heads} KV heads do not divide {num_attention_heads} attention heads"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(Error::config(
                    "num_attention_heads",
                    format!(
                        "hidden_size {hidden_size} is not divisible by {num_attention_heads} heads"
                    ),
                ))
            }
        };
        let rotary_dim = match t.rotary {
            Rotary::None => 0,
            Rotary::Full | Rotary::Partial { .. } => {
                let default = match t.rotary {
                    Rotary::Partial { hf_default } => hf_default,
                    _ => 1.0,
                };
                let partial = f.f64_or("partial_rotary_factor", default)?;
                let rotary_dim = (head_dim as f64 * partial) as usize;
                if !(partial > 0.0 && partial <= 1.0)
                    || rotary_dim == 0
                    || !rotary_dim.is_multiple_of(2)
                {
                    return Err(Error::config(
                        "partial_rotary_factor",
                        format!(
                            "{partial} of head dim {head_dim} is not an even number of dimensions"
                        ),
                    ));
                }
                rotary_dim
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(Error::config(
                "head_dim",
                format!("head dim {head_dim} must be even and in 2..=1024"),
            ));
        }
        let vocab_size = f.usize("vocab_size", MAX_VOCAB)?;
        let max_position_embeddings = match f.opt_usize("max_position_embeddings")? {
            Some(n) => check_range("max_position_embeddings", n, MAX_CONTEXT)?,
            None => t.hf_max_position_embeddings,
        };
        let eps_field = if t.layer_norm {
            "layer_norm_eps"
        } else {
            "rms_norm_eps"
        };
        let rms_norm_eps = f.f64_or(eps_field, 1e-6)?;
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(Error::config(
                "rms_norm_eps",
                format!("{rms_norm_eps} is not in (0, 1)"),
            ));
        }
        let rope_theta = f.f64_or("rope_theta", t.hf_rope_theta)?;
        check_rope_base("rope_theta", rope_theta)?;
        let rope_scaling = match map.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => RopeScaling::from_hf(
                v,
                max_position_embeddings,
                map.get("original_max_position_embeddings"),
            )?,
        };
        let default_act = match t.hidden_act {
            Activation::Silu => "silu",
            Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
        };
        let hidden_act = match f.str_or(t.hf_act_field, default_act)? {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Activation::GeluPytorchTanh,
            other => {
                return Err(Error::config(
                    t.hf_act_field,
                    format!(
                        "activation '{other}' is not supported (supported: silu, gelu_pytorch_tanh)"
                    ),
                ))
            }
        };
        let shared = Shared {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", t.hf_tie_word_embeddings)?,
            hidden_act,
            rotary_dim,
        };
        let mut cfg = Self::with_traits(t, family, shared);
        // llama / Qwen 3 `attention_bias`: q/k/v/o biases (Qwen 2 always has q/k/v ones).
        let attention_bias = f.bool_or("attention_bias", false)?;
        cfg.qkv_bias |= attention_bias;
        cfg.o_bias |= attention_bias;
        cfg.mlp_bias = f.bool_or("mlp_bias", false)?;
        // HF checkpoints rotate the two halves of each head (`rotate_half`).
        cfg.rope_interleaved = false;
        cfg.sliding_window = f.opt_usize("sliding_window")?;
        family.adapter().finish_hf(&f, &mut cfg)?;
        // Checked after the adapter: Qwen's configs carry a window they do not use.
        if let Some(w) = cfg.sliding_window {
            check_range("sliding_window", w, MAX_CONTEXT)?;
        }
        if cfg.query_pre_attn_scalar <= 0.0 {
            return Err(Error::config(
                "query_pre_attn_scalar",
                format!("{} must be positive", cfg.query_pre_attn_scalar),
            ));
        }
        Ok(cfg)
    }
}
