//! The conversion plan: which matrices are quantized, at which bits and group size.
//!
//! A [`Policy`] (the recipe, its [`QuantSpec`], the mixed-precision rule, an optional
//! user [`Predicate`]) is validated once, where it enters ([`Policy::new`]); [`make_plan`]
//! then applies it to the source's tensors. Candidates are `*.weight` matrices (2-D, or
//! 3-D stacked experts) whose rows split into whole groups, mlx-lm's rule for `Linear`,
//! `Embedding` and `SwitchLinear` (`mlx_lm/utils.py::quantize_model`); 1-D tensors (norms,
//! biases) always stay float.
//!
//! From a GGUF source a recipe never lowers a tensor below the precision it is stored at
//! (a Q8_0 embedding in a Q4_1 file stays 8-bit under `4bit`): llama.cpp's own recipes
//! keep those tensors wide on purpose. Only an explicit choice lowers one: `bits_override`
//! (`cortex convert --q-bits`) or a predicate that names `bits`. For the same reason a GGML
//! block kept float is written as f32, which holds its values exactly (f16 does not).

use std::collections::BTreeMap;

use crate::error::{Context, Error, Result};
use crate::formats::safetensors::Dtype;
use crate::quant::affine::{SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};

use super::source::SourceTensor;

/// Bits per weight and values per group of an MLX affine quantization; only supported
/// combinations can be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
}

impl QuantSpec {
    /// A spec with `bits` in [`SUPPORTED_BITS`] and `group_size` in
    /// [`SUPPORTED_GROUP_SIZES`]; the error names `bits_param` or `group_size`.
    pub fn new(bits: u32, group_size: usize, bits_param: &str) -> Result<Self> {
        Ok(QuantSpec {
            bits: checked_bits(bits, bits_param)?,
            group_size: checked_group_size(group_size)?,
        })
    }

    /// Whether rows of `cols` values split into whole groups.
    pub fn fits(self, cols: usize) -> bool {
        cols > 0 && cols.is_multiple_of(self.group_size)
    }
}

fn checked_bits(bits: u32, param: &str) -> Result<u32> {
    if SUPPORTED_BITS.contains(&bits) {
        return Ok(bits);
    }
    Err(Error::param(
        param,
        format!("{bits} bits are not supported (supported: {SUPPORTED_BITS:?})"),
    ))
}

fn checked_group_size(group_size: usize) -> Result<usize> {
    if SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Ok(group_size);
    }
    Err(Error::param(
        "group_size",
        format!("{group_size} is not supported (supported: {SUPPORTED_GROUP_SIZES:?})"),
    ))
}

/// How much to compress (`QuantizationRecipe` in Python, by value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    Bits4,
    Bits5,
    Bits8,
    /// Critical layers at `critical_bits`, projections at `standard_bits`, the rest float.
    Mixed,
    /// Float, unless a predicate asks for quantization.
    None,
}

impl Recipe {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "4bit" => Recipe::Bits4,
            "5bit" => Recipe::Bits5,
            "8bit" => Recipe::Bits8,
            "mixed" => Recipe::Mixed,
            "none" => Recipe::None,
            other => {
                return Err(Error::param(
                    "quantization",
                    format!("'{other}' is not one of 4bit, 5bit, 8bit, mixed, none"),
                ))
            }
        })
    }
}

/// The mixed-precision rule (`mixed_precision_config`); defaults are the original ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixedPrecision {
    /// Module names (a path component, or the leaf) kept at `critical_bits`.
    pub critical_layers: Vec<String>,
    pub critical_bits: u32,
    pub standard_bits: u32,
}

impl Default for MixedPrecision {
    fn default() -> Self {
        MixedPrecision {
            critical_layers: ["lm_head", "embed_tokens", "wte", "wpe"]
                .map(String::from)
                .to_vec(),
            critical_bits: 6,
            standard_bits: 4,
        }
    }
}

/// Attention and MLP projections across the families (HF leaf names), quantized at
/// `standard_bits` by the mixed recipe: a module whose path contains one of them.
const PROJECTIONS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "fc1",
    "fc2",
    "dense",
    "query_key_value",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "w1",
    "w2",
    "w3",
    "experts",
];

/// What a predicate decides for one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it float.
    Skip,
    /// Quantize it as the recipe would (at the default bits where the recipe would not).
    Quantize,
    /// Quantize it with these bits and/or group size (the default for a `None`); asked for
    /// explicitly, so it may go below the source's precision.
    With {
        bits: Option<u32>,
        group_size: Option<usize>,
    },
}

/// A user rule called once per candidate matrix (from Python, mlx-lm's `quant_predicate`).
pub trait Predicate: Send + Sync {
    /// `module`: the HF path without `.weight`; `shape`: the weight's logical shape;
    /// `config`: the source's `config.json`.
    fn decide(&self, module: &str, shape: &[usize], config: &serde_json::Value) -> Result<Verdict>;
}

/// A validated recipe.
pub struct Policy {
    pub recipe: Recipe,
    /// The recipe's default bits (`standard_bits` for mixed; 4 for `none`, used only when
    /// a predicate asks to quantize) and the group size for every module.
    pub spec: QuantSpec,
    pub mixed: MixedPrecision,
    /// Every quantized matrix at these bits (mixed tiers and the precision floor ignored).
    pub bits_override: Option<u32>,
    pub predicate: Option<Box<dyn Predicate>>,
}

impl Policy {
    /// Validates every setting; errors name the parameter (`group_size`, `bits_override`,
    /// `mixed_precision_config['critical_bits']`...).
    pub fn new(
        recipe: Recipe,
        group_size: usize,
        mixed: MixedPrecision,
        bits_override: Option<u32>,
        predicate: Option<Box<dyn Predicate>>,
    ) -> Result<Self> {
        let group_size = checked_group_size(group_size)?;
        checked_bits(
            mixed.critical_bits,
            "mixed_precision_config['critical_bits']",
        )?;
        checked_bits(
            mixed.standard_bits,
            "mixed_precision_config['standard_bits']",
        )?;
        let bits_override = bits_override
            .map(|b| checked_bits(b, "bits_override"))
            .transpose()?;
        let bits = bits_override.unwrap_or(match recipe {
            Recipe::Bits4 | Recipe::None => 4,
            Recipe::Bits5 => 5,
            Recipe::Bits8 => 8,
            Recipe::Mixed => mixed.standard_bits,
        });
        Ok(Policy {
            recipe,
            spec: QuantSpec { bits, group_size },
            mixed,
            bits_override,
            predicate,
        })
    }

    /// Whether the model-wide setting is quantized (the `none` recipe is float unless
    /// `bits_override` says otherwise).
    fn quantizes_by_default(&self) -> bool {
        self.recipe != Recipe::None || self.bits_override.is_some()
    }

    /// The recipe's choice for `module` before the predicate: `None` keeps it float.
    fn recipe_choice(&self, module: &str) -> Option<QuantSpec> {
        if self.recipe == Recipe::Mixed && self.bits_override.is_none() {
            let parts: Vec<&str> = module.split('.').collect();
            let critical = self
                .mixed
                .critical_layers
                .iter()
                .any(|c| parts.contains(&c.as_str()));
            if critical {
                return Some(QuantSpec {
                    bits: self.mixed.critical_bits,
                    ..self.spec
                });
            }
            return PROJECTIONS
                .iter()
                .any(|p| module.contains(p))
                .then_some(self.spec);
        }
        self.quantizes_by_default().then_some(self.spec)
    }
}

/// What to do with each tensor.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The model-wide setting written as `quantization` (None: a float model).
    pub default: Option<QuantSpec>,
    /// Modules (HF paths without `.weight`) to quantize; every other tensor is written as
    /// `float_dtype`.
    pub modules: BTreeMap<String, QuantSpec>,
    pub float_dtype: Dtype,
    /// Largest shard (mlx-lm: 5 GiB).
    pub max_shard_bytes: u64,
}

/// The bits of a GGML block type as [`SourceTensor::stored`] names it, for the quantized
/// types (None for floats).
fn ggml_bits(stored: &str) -> Option<u32> {
    Some(match stored {
        "Q8_0" | "Q8_1" | "Q8K" => 8,
        "Q6K" => 6,
        "Q5_0" | "Q5_1" | "Q5K" => 5,
        "Q4_0" | "Q4_1" | "Q4K" | "IQ4_NL" | "IQ4_XS" => 4,
        "Q3K" => 3,
        "Q2K" => 2,
        _ => return None,
    })
}

/// Applies `policy` to `tensors` (of a source in `format`, whose `config.json` is
/// `config`, passed to the predicate). `float_dtype` is the source's (f32 instead when
/// GGML blocks stay float); `max_shard_bytes` is copied into the plan.
pub fn make_plan(
    tensors: &[SourceTensor],
    format: &str,
    config: &serde_json::Value,
    policy: &Policy,
    float_dtype: Dtype,
    max_shard_bytes: u64,
) -> Result<Plan> {
    let mut modules = BTreeMap::new();
    // A float recipe without a predicate offers no candidates.
    let candidates = if policy.quantizes_by_default() || policy.predicate.is_some() {
        tensors
    } else {
        &[]
    };
    for t in candidates {
        let (Some(module), [.., cols]) = (t.name.strip_suffix(".weight"), t.shape.as_slice())
        else {
            continue;
        };
        if t.shape.len() < 2 {
            continue;
        }
        let mut chosen = policy.recipe_choice(module);
        let mut asked = policy.bits_override.is_some();
        if let Some(predicate) = &policy.predicate {
            chosen = match predicate.decide(module, &t.shape, config)? {
                Verdict::Skip => None,
                Verdict::Quantize => chosen.or(Some(policy.spec)),
                Verdict::With { bits, group_size } => {
                    asked |= bits.is_some();
                    let spec = QuantSpec::new(
                        bits.unwrap_or(policy.spec.bits),
                        group_size.unwrap_or(policy.spec.group_size),
                        "mixed_precision_config['predicate']",
                    );
                    Some(spec.with_context(|| format!("the predicate's verdict for '{module}'"))?)
                }
            };
        }
        let Some(mut spec) = chosen else { continue };
        if format == "gguf" && !asked {
            if let Some(stored) = ggml_bits(&t.stored) {
                spec.bits = spec.bits.max(stored);
            }
        }
        if spec.fits(*cols) {
            modules.insert(module.to_string(), spec);
        }
    }
    // f16 cannot hold a GGML block's values exactly (a Q8_0 scale times a code up to 127
    // has 18 significant bits): a quantized tensor kept float goes out as f32, so a float
    // export of a quantized GGUF is lossless too.
    let kept_float_block = tensors.iter().any(|t| {
        format == "gguf"
            && ggml_bits(&t.stored).is_some()
            && !t
                .name
                .strip_suffix(".weight")
                .is_some_and(|m| modules.contains_key(m))
    });
    let float_dtype = if kept_float_block {
        Dtype::F32
    } else {
        float_dtype
    };
    let default = if policy.quantizes_by_default() {
        Some(policy.spec)
    } else {
        modules.values().next().copied()
    };
    Ok(Plan {
        default,
        modules,
        float_dtype,
        max_shard_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[usize], stored: &str) -> SourceTensor {
        SourceTensor {
            name: name.into(),
            shape: shape.to_vec(),
            stored: stored.into(),
            parts: vec![],
        }
    }

    /// A small llama as a Q4_1 GGUF stores it: Q8_0 embedding, Q4_1 projections, F32 norm.
    fn llama() -> Vec<SourceTensor> {
        vec![
            tensor("model.embed_tokens.weight", &[100, 64], "Q8_0"),
            tensor("model.layers.0.self_attn.q_proj.weight", &[64, 64], "Q4_1"),
            tensor("model.layers.0.mlp.down_proj.weight", &[64, 96], "Q4_1"),
            tensor("model.layers.0.input_layernorm.weight", &[64], "F32"),
            tensor("model.layers.0.self_attn.q_proj.bias", &[64], "F32"),
        ]
    }

    fn policy(recipe: Recipe, group: usize) -> Result<Policy> {
        Policy::new(recipe, group, MixedPrecision::default(), None, None)
    }

    fn plan(format: &str, policy: &Policy) -> Result<Plan> {
        make_plan(
            &llama(),
            format,
            &serde_json::json!({}),
            policy,
            Dtype::F16,
            1 << 30,
        )
    }

    fn bits(plan: &Plan, module: &str) -> Option<u32> {
        plan.modules.get(module).map(|s| s.bits)
    }

    #[test]
    fn quant_spec_rejects_unsupported_values_naming_the_parameter() -> Result<()> {
        assert_eq!(QuantSpec::new(4, 64, "bits")?.group_size, 64);
        for (bits, group, param) in [(7, 64, "bits"), (4, 48, "group_size"), (0, 32, "bits")] {
            match QuantSpec::new(bits, group, "bits") {
                Err(Error::InvalidParam { param: p, message }) => {
                    assert_eq!(p, param);
                    assert!(message.contains("supported"), "{message}");
                }
                other => panic!("({bits}, {group}) gave {other:?}"),
            }
        }
        let bad = Policy::new(Recipe::Bits4, 96, MixedPrecision::default(), None, None);
        assert!(matches!(bad, Err(Error::InvalidParam { param, .. }) if param == "group_size"));
        let mixed = MixedPrecision {
            critical_bits: 7,
            ..MixedPrecision::default()
        };
        let bad = Policy::new(Recipe::Mixed, 64, mixed, None, None);
        assert!(
            matches!(bad, Err(Error::InvalidParam { param, .. }) if param.contains("critical_bits"))
        );
        assert!(Recipe::parse("3bit").is_err());
        Ok(())
    }

    #[test]
    fn recipes_quantize_matrices_whose_rows_split_into_groups() -> Result<()> {
        let p = plan("safetensors", &policy(Recipe::Bits5, 32)?)?;
        assert_eq!(p.default, Some(QuantSpec::new(5, 32, "bits")?));
        assert_eq!(p.modules.len(), 3, "{:?}", p.modules);
        // Rows of 96 values do not split into groups of 64: that matrix stays float.
        let p = plan("safetensors", &policy(Recipe::Bits4, 64)?)?;
        assert_eq!(bits(&p, "model.layers.0.mlp.down_proj"), None);
        assert_eq!(bits(&p, "model.embed_tokens"), Some(4));
        let p = plan("safetensors", &policy(Recipe::None, 64)?)?;
        assert!(p.default.is_none() && p.modules.is_empty());
        Ok(())
    }

    #[test]
    fn mixed_keeps_critical_layers_wider_and_norms_float() -> Result<()> {
        let p = plan("safetensors", &policy(Recipe::Mixed, 32)?)?;
        assert_eq!(p.default.map(|s| s.bits), Some(4));
        assert_eq!(bits(&p, "model.embed_tokens"), Some(6));
        assert_eq!(bits(&p, "model.layers.0.self_attn.q_proj"), Some(4));
        assert!(!p.modules.keys().any(|m| m.contains("layernorm")));
        Ok(())
    }

    #[test]
    fn gguf_sources_keep_their_precision_unless_asked() -> Result<()> {
        let p = plan("gguf", &policy(Recipe::Bits4, 32)?)?;
        assert_eq!(bits(&p, "model.embed_tokens"), Some(8)); // Q8_0 stays 8-bit
        assert_eq!(bits(&p, "model.layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(p.default.map(|s| s.bits), Some(4));
        // Not from other sources, and not when bits are asked for explicitly.
        let p = plan("mlx", &policy(Recipe::Bits4, 32)?)?;
        assert_eq!(bits(&p, "model.embed_tokens"), Some(4));
        let forced = Policy::new(Recipe::Bits4, 32, MixedPrecision::default(), Some(3), None)?;
        assert_eq!(bits(&plan("gguf", &forced)?, "model.embed_tokens"), Some(3));
        // A float export keeps the blocks' values exactly: f32, not the source's f16.
        assert_eq!(
            plan("gguf", &policy(Recipe::Bits4, 32)?)?.float_dtype,
            Dtype::F16
        );
        assert_eq!(
            plan("gguf", &policy(Recipe::None, 32)?)?.float_dtype,
            Dtype::F32
        );
        assert_eq!(
            plan("mlx", &policy(Recipe::None, 32)?)?.float_dtype,
            Dtype::F16
        );
        // Raising is always allowed.
        assert_eq!(
            bits(
                &plan("gguf", &policy(Recipe::Bits8, 32)?)?,
                "model.layers.0.mlp.down_proj"
            ),
            Some(8)
        );
        Ok(())
    }

    /// Quantizes only attention, the embedding explicitly at 2 bits in groups of 64.
    struct AttentionOnly;

    impl Predicate for AttentionOnly {
        fn decide(&self, module: &str, shape: &[usize], _: &serde_json::Value) -> Result<Verdict> {
            assert!(shape.len() >= 2, "only matrices are offered");
            Ok(if module.contains("embed") {
                Verdict::With {
                    bits: Some(2),
                    group_size: Some(64),
                }
            } else if module.contains("self_attn") {
                Verdict::Quantize
            } else {
                Verdict::Skip
            })
        }
    }

    /// Asks for an unsupported group size.
    struct BadGroup;

    impl Predicate for BadGroup {
        fn decide(&self, _: &str, _: &[usize], _: &serde_json::Value) -> Result<Verdict> {
            Ok(Verdict::With {
                bits: None,
                group_size: Some(100),
            })
        }
    }

    #[test]
    fn predicates_decide_per_module_and_are_validated() -> Result<()> {
        let pred = Box::new(AttentionOnly);
        let p = Policy::new(
            Recipe::None,
            32,
            MixedPrecision::default(),
            None,
            Some(pred),
        )?;
        let plan = plan("gguf", &p)?;
        // An explicit verdict goes below the source's Q8_0.
        assert_eq!(
            plan.modules.get("model.embed_tokens"),
            Some(&QuantSpec::new(2, 64, "bits")?)
        );
        assert_eq!(bits(&plan, "model.layers.0.self_attn.q_proj"), Some(4));
        assert_eq!(bits(&plan, "model.layers.0.mlp.down_proj"), None);
        // A float recipe with quantized modules records the first module's setting.
        assert_eq!(plan.default.map(|s| s.bits), Some(2));
        let p = Policy::new(
            Recipe::Bits4,
            32,
            MixedPrecision::default(),
            None,
            Some(Box::new(BadGroup)),
        )?;
        match make_plan(&llama(), "gguf", &serde_json::json!({}), &p, Dtype::F16, 1) {
            Err(Error::InvalidParam { param, .. }) => assert_eq!(param, "group_size"),
            other => panic!("{other:?}"),
        }
        Ok(())
    }
}
