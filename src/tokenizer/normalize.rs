//! Bounds on what a tokenizer's normalizer may make of its input (RELIABILITY.md B16).
//!
//! A `tokenizer.json` normalizer can multiply its input: `Replace "a" -> "a" x 1000`
//! chained three times turns one "a" into 10^9 bytes, and `tokenizers` tracks 16 bytes of
//! alignment per normalized byte besides, so encoding a short text would hang or abort the
//! process. Each normalizer has a worst-case growth known from its configuration; when that
//! bound keeps a text's normalized form under the limit (always, for real tokenizers and
//! ordinary texts), encoding goes ahead untouched. Otherwise the normalizer is first run on
//! the text step by step, each `Replace` measured (its matches counted) before it runs, and
//! the text is refused as soon as its normalized form would pass the limit.

use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::utils::SysRegex;
use tokenizers::{NormalizedString, Normalizer};

use crate::error::{Error, Result};

/// A normalized text may be this many times longer than the text (real normalizers stay
/// under ~18x even for the longest Unicode decompositions)...
const MAX_GROWTH: usize = 64;
/// ...plus this many bytes (prefixes such as SentencePiece's "▁")...
const MAX_EXTRA: usize = 4096;
/// ...and never longer than this in all.
const MAX_NORMALIZED_BYTES: usize = 64 << 20;

/// One step of a (flattened) normalizer and the worst growth it can cause: an output of
/// at most `factor` bytes per input byte plus `extra` bytes.
#[derive(Debug)]
struct Step {
    normalizer: NormalizerWrapper,
    /// For `Replace`: the pattern (compiled) and the replacement's length.
    replace: Option<(Pattern, usize)>,
    factor: usize,
    extra: usize,
}

#[derive(Debug)]
enum Pattern {
    Literal(String),
    Regex(SysRegex),
}

impl Pattern {
    /// How many times `self` matches in `text`.
    fn count(&self, text: &str) -> usize {
        match self {
            Pattern::Literal(p) if p.is_empty() => text.chars().count() + 1,
            Pattern::Literal(p) => text.matches(p.as_str()).count(),
            Pattern::Regex(r) => r.find_iter(text).count(),
        }
    }
}

/// A tokenizer's normalizer with its growth bound.
#[derive(Debug, Default)]
pub struct NormalizerGuard {
    steps: Vec<Step>,
    /// The whole chain's worst case: `factor * len + extra`, saturating.
    factor: usize,
    extra: usize,
}

fn flatten(n: &NormalizerWrapper, out: &mut Vec<NormalizerWrapper>) {
    match n {
        NormalizerWrapper::Sequence(seq) => seq.as_ref().iter().for_each(|n| flatten(n, out)),
        other => out.push(other.clone()),
    }
}

fn step(normalizer: NormalizerWrapper) -> Result<Step> {
    use NormalizerWrapper as N;
    let (mut replace, mut factor, mut extra) = (None, 1, 0);
    match &normalizer {
        N::Replace(r) => {
            // The pattern is private to `tokenizers`; its serialized form names it.
            let json = serde_json::to_value(r)
                .map_err(|e| Error::Tokenizer(format!("reading a Replace normalizer: {e}")))?;
            let content = r.content.len();
            let pattern = match (&json["pattern"]["String"], &json["pattern"]["Regex"]) {
                (serde_json::Value::String(s), _) => Pattern::Literal(s.clone()),
                (_, serde_json::Value::String(re)) => Pattern::Regex(
                    SysRegex::new(re)
                        .map_err(|e| Error::Tokenizer(format!("normalizer pattern {re:?}: {e}")))?,
                ),
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "unrecognised Replace normalizer {json}"
                    )))
                }
            };
            // Each match (at least one byte, or an empty match between bytes) becomes
            // `content`.
            factor = match &pattern {
                Pattern::Literal(p) if !p.is_empty() => content.div_ceil(p.len()).max(1),
                _ => 1 + content,
            };
            extra = content;
            replace = Some((pattern, content));
        }
        N::Prepend(p) => extra = p.prepend.len(),
        N::StripNormalizer(_) | N::StripAccents(_) | N::Nmt(_) => {}
        N::ByteLevel(_) => factor = 2,
        N::NFC(_) | N::NFD(_) | N::Lowercase(_) | N::BertNormalizer(_) => factor = 3,
        // NFKC/NFKD/Precompiled (SentencePiece's NFKC tables) and anything newer: Unicode's
        // longest decomposition, U+FDFA, is 18 characters.
        _ => factor = 18,
    }
    Ok(Step {
        normalizer,
        replace,
        factor,
        extra,
    })
}

impl NormalizerGuard {
    pub fn new(normalizer: Option<&NormalizerWrapper>) -> Result<Self> {
        let mut flat = Vec::new();
        if let Some(n) = normalizer {
            flatten(n, &mut flat);
        }
        let steps = flat.into_iter().map(step).collect::<Result<Vec<_>>>()?;
        // Composing f(x) = a*x + b after g(x) = c*x + d: a*c*x + a*d + b.
        let (factor, extra) = steps.iter().fold((1usize, 0usize), |(f, e), s| {
            (
                f.saturating_mul(s.factor),
                e.saturating_mul(s.factor).saturating_add(s.extra),
            )
        });
        Ok(NormalizerGuard {
            steps,
            factor,
            extra,
        })
    }

    /// Checks that `text` normalizes to at most the limit for its length.
    pub fn check(&self, text: &str) -> Result<()> {
        let limit = text
            .len()
            .saturating_mul(MAX_GROWTH)
            .saturating_add(MAX_EXTRA)
            .min(MAX_NORMALIZED_BYTES);
        let worst = self
            .factor
            .saturating_mul(text.len())
            .saturating_add(self.extra);
        if worst <= limit {
            return Ok(());
        }
        let refuse = |len: usize| {
            Err(Error::Tokenizer(format!(
                "the tokenizer's normalizer would turn {} bytes of text into {len} or more, past the limit of {limit} (tokenizer.json's normalizer multiplies its input)",
                text.len()
            )))
        };
        let mut n = NormalizedString::from(text);
        for s in &self.steps {
            // A Replace can grow the text without bound in one step: count its matches
            // first. Other steps grow it at most 18x, so running them on a text within the
            // limit costs a bounded amount, and their result is measured after.
            if let Some((pattern, content)) = &s.replace {
                let grown = n
                    .len()
                    .saturating_add(pattern.count(n.get()).saturating_mul(*content));
                if grown > limit {
                    return refuse(grown);
                }
            }
            s.normalizer
                .normalize(&mut n)
                .map_err(|e| Error::Tokenizer(format!("normalizing: {e}")))?;
            if n.len() > limit {
                return refuse(n.len());
            }
        }
        Ok(())
    }
}
