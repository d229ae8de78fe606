//! Validation of a finished conversion with the crate's own decoder: the output loads, its
//! tokenizer decodes what it encodes, its kernels give finite logits, and over a fixed text
//! of [`VALIDATION_TOKENS`] tokens its next-token distributions are measured against the
//! source's: mean and max KL(source ‖ converted) and top-1 agreement.
//!
//! Like with like: both models are compared computing in f32 from their dequantized weights
//! ([`Model::dequantized`]), so the numbers measure what the conversion changed in the
//! weights and nothing else. (Run on their kernels, a quantized source rounds activations to
//! 8 bits per block and a float output does not: a lossless float export measured 94.5 %
//! agreement that way.)

use std::path::Path;

use serde::Serialize;

use crate::engine::sampling::argmax;
use crate::error::{bail, Error, Result};
use crate::model::{load_model, load_tokenizer, Model};
use crate::progress::Progress;

/// Tokens of the validation text that are compared (the text encodes to more).
pub const VALIDATION_TOKENS: usize = 256;

/// Fixed English text for validation (public-domain prose, well over 256 tokens).
const VALIDATION_PARAGRAPH: &str = "It was the best of times, it was the worst of times, \
it was the age of wisdom, it was the age of foolishness, it was the epoch of belief, it was the \
epoch of incredulity, it was the season of Light, it was the season of Darkness, it was the \
spring of hope, it was the winter of despair, we had everything before us, we had nothing before \
us, we were all going direct to Heaven, we were all going direct the other way. In short, the \
period was so far like the present period, that some of its noisiest authorities insisted on its \
being received, for good or for evil, in the superlative degree of comparison only. There were a \
king with a large jaw and a queen with a plain face, on the throne of England; there were a king \
with a large jaw and a queen with a fair face, on the throne of France. In both countries it was \
clearer than crystal to the lords of the State preserves of loaves and fishes, that things in \
general were settled for ever. The mail coach rumbled up the hill in the dark, its lamps throwing \
small pools of yellow light on the wet road, while the guard kept one hand on the arm-chest and \
the other on his blunderbuss. Rust is a programming language that promises memory safety without \
a garbage collector: ownership, borrowing and lifetimes let the compiler prove that references \
never outlive the data they point to, and that no two threads ever write to the same memory at \
once. Quantization stores each group of weights as small integers with a scale and a bias, so a \
model that needed four bytes per weight can run from half a byte, trading a little accuracy for \
a large saving in memory and bandwidth. ";

/// What validation measured, for `conversion.json`.
#[derive(Debug, Default, Serialize)]
pub struct Quality {
    /// Positions compared.
    pub tokens: usize,
    /// Whether the output has a tokenizer (without one, fixed token ids are used).
    pub tokenizer: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Why the source could not be compared, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// Agreement of two runs over the same positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    pub mean_kl: f64,
    pub max_kl: f64,
    pub top1: f64,
}

/// `ln softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    let log_sum = sum.ln();
    row.iter().map(|&x| f64::from(x) - max - log_sum).collect()
}

/// KL(reference ‖ got) per position and top-1 agreement of two `[positions, vocab]`
/// row-major logit matrices.
pub fn agreement(reference: &[f32], got: &[f32], vocab: usize) -> Result<Agreement> {
    if vocab == 0 || reference.len() != got.len() || reference.is_empty() {
        bail!(
            Internal,
            "logits of {} and {} values do not form matching rows of {vocab}",
            reference.len(),
            got.len()
        );
    }
    let (mut sum_kl, mut max_kl, mut same) = (0f64, 0f64, 0usize);
    let rows = reference.len() / vocab;
    for (r, g) in reference.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
        let (p, q) = (log_softmax(r), log_softmax(g));
        let kl: f64 = p.iter().zip(&q).map(|(p, q)| p.exp() * (p - q)).sum();
        sum_kl += kl;
        max_kl = max_kl.max(kl);
        same += usize::from(argmax(r) == argmax(g));
    }
    Ok(Agreement {
        mean_kl: sum_kl / rows as f64,
        max_kl,
        top1: same as f64 / rows as f64,
    })
}

/// Logits `[ids.len(), vocab]` of `model` computing in f32 from dequantized weights.
fn f32_logits(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    Ok(model.dequantized()?.forward(ids, true)?.0)
}

/// The token ids validation runs: the first [`VALIDATION_TOKENS`] of the text with the
/// output's tokenizer (after checking it decodes what it encodes), or a fixed pseudo-random
/// sequence for weights without a tokenizer. Returns `(ids, tokenizer found)`.
fn validation_ids(output: &Path, vocab: usize) -> Result<(Vec<u32>, bool)> {
    let tokenizer = match load_tokenizer(output) {
        Ok(t) => t,
        Err(Error::ModelNotFound { .. }) => {
            let ids = (0..VALIDATION_TOKENS).map(|i| ((i * 7919 + 13) % vocab) as u32);
            return Ok((ids.collect(), false));
        }
        Err(e) => return Err(e),
    };
    let text = VALIDATION_PARAGRAPH.repeat(2);
    let mut ids = tokenizer.encode(&text, true)?;
    let back = tokenizer.decode(&ids, true)?;
    let head: String = text.trim().chars().take(200).collect();
    if !back.contains(&head) {
        bail!(
            Conversion,
            "the converted tokenizer does not decode what it encodes"
        );
    }
    ids.truncate(VALIDATION_TOKENS);
    Ok((ids, true))
}

/// Validates the conversion written at `output` against `source` (see the module header).
/// Stops with `Error::Cancelled` between steps once `progress` is cancelled. A source
/// that cannot be run is reported in [`Quality::reference`], not as an error.
pub fn validate(output: &Path, source: &Path, progress: &Progress) -> Result<Quality> {
    let converted = load_model(output)?;
    let vocab = converted.config.vocab_size;
    let (ids, tokenizer) = validation_ids(output, vocab)?;
    let mut quality = Quality {
        tokens: ids.len(),
        tokenizer,
        ..Quality::default()
    };
    // Its own kernels first: what a user of the output will run.
    let (native, _) = converted.forward(&ids, true)?;
    if !native.iter().all(|x| x.is_finite()) {
        bail!(
            Conversion,
            "the converted model produces NaN or infinite logits"
        );
    }
    drop(native);
    progress.check_cancelled()?;
    let got = f32_logits(&converted, &ids)?;
    drop(converted);
    progress.check_cancelled()?;
    let reference = match load_model(source).and_then(|m| f32_logits(&m, &ids)) {
        Ok(r) => r,
        Err(e @ Error::Cancelled) => return Err(e),
        Err(e) => {
            quality.reference = Some(format!("source could not be run for comparison: {e}"));
            return Ok(quality);
        }
    };
    let a = agreement(&reference, &got, vocab)?;
    quality.mean_kl = Some(a.mean_kl);
    quality.max_kl = Some(a.max_kl);
    quality.top1_agreement = Some(a.top1);
    Ok(quality)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_fully() -> Result<()> {
        let logits = [0.5, -1.0, 2.0, 0.0, 3.0, 1.0, -2.0, 0.25];
        let a = agreement(&logits, &logits, 4)?;
        assert_eq!(a.top1, 1.0);
        assert!(a.mean_kl.abs() < 1e-12 && a.max_kl.abs() < 1e-12, "{a:?}");
        Ok(())
    }

    #[test]
    fn kl_and_top1_match_a_hand_computation() -> Result<()> {
        // Row 0: p = (½, ½), q = (0.2, 0.8), so KL = ½·ln(½/0.2) + ½·ln(½/0.8), and the
        // argmax differs (ties go to the first index). Row 1 is identical in both.
        let q0 = [0.2f32.ln(), 0.8f32.ln()];
        let reference = [0.0, 0.0, 1.0, 0.0];
        let got = [q0[0], q0[1], 1.0, 0.0];
        let a = agreement(&reference, &got, 2)?;
        let kl0 = 0.5 * (0.5f64 / 0.2).ln() + 0.5 * (0.5f64 / 0.8).ln();
        assert!((a.max_kl - kl0).abs() < 1e-6, "{a:?} vs {kl0}");
        assert!((a.mean_kl - kl0 / 2.0).abs() < 1e-6);
        assert_eq!(a.top1, 0.5);
        Ok(())
    }

    #[test]
    fn mismatched_logits_are_an_error() {
        assert!(agreement(&[0.0; 6], &[0.0; 4], 2).is_err());
        assert!(agreement(&[], &[], 2).is_err());
    }

    #[test]
    fn the_text_is_long_enough() {
        // At worst ~4 characters per token: twice the paragraph gives well over 256 tokens.
        assert!(VALIDATION_PARAGRAPH.len() * 2 > 4 * VALIDATION_TOKENS);
    }
}
