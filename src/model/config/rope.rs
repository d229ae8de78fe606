//! RoPE scaling: read from GGUF metadata (`{arch}.rope.scaling.*`, llama 3's
//! `rope_freqs` tensor) and from `config.json` (`rope_scaling`: linear, llama3, yarn, as
//! transformers' `modeling_rope_utils.py`), and the per-frequency divisors it implies.

use candle_core::quantized::gguf_file::Value;

use super::{meta_f64, RopeScaling};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

/// A RoPE base: past 1 (the frequencies `base^(-2i/d)` must fall) and finite in f32, the
/// type the rotation tables are computed in.
pub(crate) fn check_rope_base(field: &str, base: f64) -> Result<()> {
    if base <= 1.0 || !(base as f32).is_finite() {
        return Err(Error::config(
            field,
            format!("{base} must be greater than 1 and at most {:e}", f32::MAX),
        ));
    }
    Ok(())
}

impl RopeScaling {
    /// The scaling of a GGUF model (`arch` is its `general.architecture`).
    pub(crate) fn from_gguf(g: &GgufFile, arch: &str) -> Result<Option<RopeScaling>> {
        if g.has_tensor("rope_freqs.weight") {
            return Ok(Some(RopeScaling::Llama3));
        }
        let ty_key = format!("{arch}.rope.scaling.type");
        let ty = match g.get(&ty_key) {
            None => return Ok(None),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(Error::config(
                    ty_key,
                    format!("expected a string, got {v:?}"),
                ))
            }
        };
        let factor_key = format!("{arch}.rope.scaling.factor");
        match ty {
            "none" => Ok(None),
            "linear" => {
                let factor = meta_f64(g, &factor_key)?.ok_or_else(|| Error::config(&factor_key, "missing for linear rope scaling"))?;
                if factor <= 0.0 {
                    return Err(Error::config(factor_key, format!("factor {factor} must be positive")));
                }
                Ok(if factor == 1.0 { None } else { Some(RopeScaling::Linear { factor: factor as f32 }) })
            }
            other => Err(Error::config(ty_key, format!("rope scaling type '{other}' is not supported (supported: none, linear, llama3 via rope_freqs)"))),
        }
    }

    /// The scaling of `config.json`'s `rope_scaling` (`v`), `None` for none or `default`.
    pub(crate) fn from_hf(
        v: &serde_json::Value,
        max_position_embeddings: usize,
        top_level_original: Option<&serde_json::Value>,
    ) -> Result<Option<Self>> {
        let ty = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let factor = v.get("factor").and_then(serde_json::Value::as_f64);
        let num = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .filter(|x| *x > 0.0 && x.is_finite())
        };
        match (ty, factor) {
            ("default", _) => Ok(None),
            ("llama3", Some(factor)) if factor >= 1.0 && factor.is_finite() => {
                let (Some(low), Some(high), Some(original)) = (
                    num("low_freq_factor"),
                    num("high_freq_factor"),
                    num("original_max_position_embeddings"),
                ) else {
                    return Err(Error::config(
                        "rope_scaling",
                        "llama3 scaling needs positive low_freq_factor, high_freq_factor and original_max_position_embeddings",
                    ));
                };
                if high <= low {
                    return Err(Error::config(
                        "rope_scaling",
                        "high_freq_factor must exceed low_freq_factor",
                    ));
                }
                // Divides the wavelength bounds; below one position it truncates to 0.
                if original < 1.0 {
                    return Err(Error::config(
                        "rope_scaling.original_max_position_embeddings",
                        format!("{original} must be at least 1"),
                    ));
                }
                Ok(Some(RopeScaling::Llama3Params {
                    factor: factor as f32,
                    low_freq_factor: low as f32,
                    high_freq_factor: high as f32,
                    original_max_position_embeddings: original as usize,
                }))
            }
            ("yarn", _) => Ok(Some(Self::yarn(
                v,
                factor,
                max_position_embeddings,
                top_level_original,
            )?)),
            ("linear", Some(factor)) if factor > 0.0 && factor.is_finite() => Ok((factor != 1.0)
                .then_some(RopeScaling::Linear {
                    factor: factor as f32,
                })),
            _ => Err(Error::config(
                "rope_scaling",
                format!("{v} is not supported (supported: linear, llama3, yarn)"),
            )),
        }
    }

    /// YaRN's settings from `rope_scaling` (transformers' defaults and attention factor).
    fn yarn(
        v: &serde_json::Value,
        factor: Option<f64>,
        max_position_embeddings: usize,
        top_level_original: Option<&serde_json::Value>,
    ) -> Result<RopeScaling> {
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let original = v
            .get("original_max_position_embeddings")
            .or(top_level_original)
            .and_then(serde_json::Value::as_u64)
            .map_or(max_position_embeddings, |x| x as usize);
        let factor = factor.unwrap_or(max_position_embeddings as f64 / original as f64);
        let positive = |x: f64| x > 0.0 && x.is_finite();
        if !positive(factor) || original == 0 {
            return Err(Error::config(
                "rope_scaling",
                "yarn needs a positive factor and original_max_position_embeddings",
            ));
        }
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match (
            num("attention_factor"),
            num("mscale"),
            num("mscale_all_dim"),
        ) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(factor, m) / mscale(factor, all)
            }
            _ => mscale(factor, 1.0),
        };
        let beta_fast = num("beta_fast").unwrap_or(32.0);
        let beta_slow = num("beta_slow").unwrap_or(1.0);
        if ![attention_factor, beta_fast, beta_slow]
            .into_iter()
            .all(positive)
        {
            return Err(Error::config(
                "rope_scaling",
                "yarn's attention_factor, beta_fast and beta_slow must be positive",
            ));
        }
        Ok(RopeScaling::Yarn {
            factor: factor as f32,
            original_max_position_embeddings: original,
            beta_fast: beta_fast as f32,
            beta_slow: beta_slow as f32,
            attention_factor: attention_factor as f32,
            truncate: v
                .get("truncate")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true),
        })
    }
}

impl RopeScaling {
    /// What the rotated dimensions are multiplied by (YaRN's attention factor; else 1).
    pub fn attention_factor(&self) -> f32 {
        match *self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// Per-frequency divisors of the inverse frequencies, for the scalings computed from
    /// the config (llama 3, YaRN).
    pub fn frequency_factors(&self, head_dim: usize, theta: f32) -> Option<Vec<f32>> {
        if let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = *self
        {
            return Some(yarn_factors(
                head_dim, theta, factor, original, beta_fast, beta_slow, truncate,
            ));
        }
        let RopeScaling::Llama3Params {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        } = *self
        else {
            return None;
        };
        let original = original as f64;
        let (low_wavelen, high_wavelen) = (original / f64::from(low), original / f64::from(high));
        Some(
            (0..head_dim / 2)
                .map(|i| {
                    let inv = 1.0 / f64::from(theta).powf(2.0 * i as f64 / head_dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / inv;
                    let scaled = if wavelen < high_wavelen {
                        inv
                    } else if wavelen > low_wavelen {
                        inv / f64::from(factor)
                    } else {
                        let smooth = (original / wavelen - f64::from(low)) / f64::from(high - low);
                        (1.0 - smooth) * inv / f64::from(factor) + smooth * inv
                    };
                    (inv / scaled) as f32
                })
                .collect(),
        )
    }
}

/// YaRN's divisors, as transformers' `_compute_yarn_parameters`: pair `i` keeps its
/// frequency (extrapolation) below the ramp, is divided by `factor` (interpolation) above
/// it, and blends linearly across it; the ramp runs between the pair indices at which a
/// frequency turns `beta_fast` and `beta_slow` times over the original context.
fn yarn_factors(
    dim: usize,
    theta: f32,
    factor: f32,
    original: usize,
    beta_fast: f32,
    beta_slow: f32,
    truncate: bool,
) -> Vec<f32> {
    let (d, base) = (dim as f64, f64::from(theta));
    let correction = |rotations: f32| {
        d * (original as f64 / (f64::from(rotations) * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001; // as transformers: no division by zero
    }
    (0..dim / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp; // weight of the unscaled frequency
            let scale = (1.0 - keep) / f64::from(factor) + keep;
            (1.0 / scale) as f32
        })
        .collect()
}
