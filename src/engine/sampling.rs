//! Sampling parameters (OpenAI/vLLM names and ranges) and the sampler.
//!
//! Logits processing follows transformers' order: repetition penalty (CTRL, Keskar et al.
//! 2019) and OpenAI presence/frequency penalties on the raw logits, then temperature,
//! top-k, top-p (nucleus, Holtzman et al. 2019) and min-p (Nguyen et al. 2024) on the
//! distribution. Each request draws from its own seed, one draw per position, so a seed
//! reproduces the same text whatever else runs.
//!
//! The draw itself is defined in integers so that a GPU repeats it bit for bit
//! (`kernels.cu` `sample_rows`): every candidate's weight is `2^40 · exp((logit − max) /
//! temperature)` rounded down (see [`weight`]: the exponential is a polynomial of
//! additions and multiplications each rounded once, which IEEE arithmetic gives alike on
//! any device), the filters and the draw sum those weights exactly, and a 64-bit draw
//! picks the token where the running sum, in vocabulary order, passes `draw · mass /
//! 2^64`. No result depends on the order of a sum, so a parallel kernel and this loop
//! agree on every token.

use std::borrow::Cow;
use std::collections::HashMap;

use llguidance::toktrie::SimpleVob;

use super::grammar::{self, Constraint};
use crate::error::{Error, Result};
use crate::model::Draw;

/// Most stop strings per request, and the longest one, in bytes.
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_BYTES: usize = 1024;
/// Largest number of top alternatives returned with `logprobs`.
pub const MAX_LOGPROBS: usize = 20;
/// Temperatures below this are raised to it: smaller ones only overflow `exp`.
pub const MIN_TEMPERATURE: f32 = 0.01;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise in (0, 2].
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all; above the vocabulary means all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in [0, 1].
    pub min_p: f32,
    /// > 0; 1 disables. Applies to every token of the prompt and the output.
    pub repetition_penalty: f32,
    /// In [-2, 2]; subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// In [-2, 2]; subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// At least 1. Generation also ends when the context is full.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Return the log-probability of each token and of the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-sequence tokens (benchmarks, load tests).
    pub ignore_eos: bool,
    /// What the output must match (a JSON schema, a regex, a Lark grammar): tokens that
    /// would break it are never sampled, and generation stops once it is complete.
    pub constraint: Option<Constraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 256,
            stop: Vec::new(),
            seed: None,
            logprobs: None,
            ignore_eos: false,
            constraint: None,
        }
    }
}

impl SamplingParams {
    /// Greedy, with nothing that reads the logits but their argmax: no penalty, no
    /// logprobs, no constraint. Such a request can take the argmax the GPU computed.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0
            && !self.is_penalized()
            && self.logprobs.is_none()
            && self.constraint.is_none()
    }

    /// Whether a penalty changes the logits (they then depend on the tokens so far).
    pub fn is_penalized(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Checks every field; the error names the first field at fault.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=2.0).contains(&t) {
            return Err(Error::param("temperature", format!("{t} is not in [0, 2]")));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(Error::param(
                "top_p",
                format!("{} is not in (0, 1]", self.top_p),
            ));
        }
        if !self.min_p.is_finite() || !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::param(
                "min_p",
                format!("{} is not in [0, 1]", self.min_p),
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::param(
                "repetition_penalty",
                format!("{} must be a positive number", self.repetition_penalty),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return Err(Error::param(name, format!("{v} is not in [-2, 2]")));
            }
        }
        if self.max_tokens == 0 {
            return Err(Error::param("max_tokens", "must be at least 1"));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::param(
                "stop",
                format!(
                    "{} stop strings, at most {MAX_STOP_STRINGS} allowed",
                    self.stop.len()
                ),
            ));
        }
        for s in &self.stop {
            if s.is_empty() {
                return Err(Error::param("stop", "stop strings cannot be empty"));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(Error::param(
                    "stop",
                    format!(
                        "a stop string of {} bytes exceeds {MAX_STOP_BYTES}",
                        s.len()
                    ),
                ));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(Error::param(
                    "logprobs",
                    format!("{n} is more than the maximum of {MAX_LOGPROBS}"),
                ));
            }
        }
        self.constraint
            .as_ref()
            .map_or(Ok(()), Constraint::validate)
    }

    /// The parameter that carries the constraint, for errors about it.
    pub(crate) fn constraint_param(&self) -> &'static str {
        self.constraint
            .as_ref()
            .map_or("constraint", Constraint::param)
    }

    /// Maps a user seed: -1 (or none) draws a fresh one; other negatives and values past
    /// u64 are rejected.
    pub fn seed_from(seed: Option<i128>) -> Result<Option<u64>> {
        match seed {
            None | Some(-1) => Ok(None),
            Some(s) => u64::try_from(s)
                .map(Some)
                .map_err(|_| Error::param("seed", format!("{s} is not -1 or in [0, 2^64)"))),
        }
    }
}

/// transformers' `top_k` when sampling and none is given (`GenerationConfig.top_k = 50`):
/// what `do_sample=True` brings with it here too.
pub const TRANSFORMERS_TOP_K: usize = 50;

/// Sampling settings as a caller passes them: our names, and other tools' names for three
/// of them, so their users' calls run unchanged: `max_new_tokens` (transformers) for
/// `max_tokens`, `temp` (mlx-lm) for `temperature`, and `do_sample` (transformers).
/// `None` means not given. Counts are signed, so that a negative one is reported under the
/// name it was given. [`SamplingArgs::resolve`] turns them into [`SamplingParams`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingArgs {
    pub temperature: Option<f32>,
    pub temp: Option<f32>,
    pub do_sample: Option<bool>,
    pub top_k: Option<i64>,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub max_tokens: Option<i64>,
    pub max_new_tokens: Option<i64>,
    pub stop: Vec<String>,
    pub seed: Option<i128>,
    pub logprobs: Option<i64>,
    pub ignore_eos: bool,
    pub constraint: Option<Constraint>,
}

impl Default for SamplingArgs {
    fn default() -> Self {
        let p = SamplingParams::default();
        SamplingArgs {
            temperature: None,
            temp: None,
            do_sample: None,
            top_k: None,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            max_tokens: None,
            max_new_tokens: None,
            stop: Vec::new(),
            seed: None,
            logprobs: None,
            ignore_eos: false,
            constraint: None,
        }
    }
}

/// [`SamplingArgs`] resolved: the settings, and what the caller should be warned about
/// (a setting that was given but has no effect), one sentence each.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSampling {
    pub params: SamplingParams,
    pub warnings: Vec<String>,
}

/// A count given by the caller as `param`; negative ones are rejected under that name.
fn count(param: &str, value: i64) -> Result<usize> {
    usize::try_from(value).map_err(|_| Error::param(param, format!("{value} must not be negative")))
}

/// One setting passed under our name (`name`) or another tool's (`alias`): the value and
/// the name it came under (ours when neither is given), or an error naming both when they
/// disagree.
fn same_setting<'a, T: PartialEq + std::fmt::Display>(
    name: &'a str,
    value: Option<T>,
    alias: &'a str,
    alias_value: Option<T>,
) -> Result<(Option<T>, &'a str)> {
    match (value, alias_value) {
        (Some(a), Some(b)) if a != b => Err(Error::param(
            alias,
            format!("{alias}={b} and {name}={a} are the same setting; pass one of them"),
        )),
        (Some(a), _) => Ok((Some(a), name)),
        (None, Some(b)) => Ok((Some(b), alias)),
        (None, None) => Ok((None, name)),
    }
}

impl SamplingArgs {
    /// The settings these arguments ask for, validated; every error names the argument as
    /// the caller spelled it (`max_new_tokens=0` is an error about `max_new_tokens`).
    ///
    /// `do_sample` follows transformers: `False` decodes greedily, and sampling settings
    /// given with it (`temperature`, `top_k`, `top_p`, `min_p`) are unused and named in a
    /// warning; `True` samples at `temperature` (default 1.0; 0 is an error, as
    /// transformers' is) with `top_k` 50 unless one is given ([`TRANSFORMERS_TOP_K`]).
    /// Without `do_sample`, our defaults hold: greedy, no top-k.
    pub fn resolve(self) -> Result<ResolvedSampling> {
        let (max_tokens, max_name) = same_setting(
            "max_tokens",
            self.max_tokens,
            "max_new_tokens",
            self.max_new_tokens,
        )?;
        let max_tokens = count(max_name, max_tokens.unwrap_or(256))?;
        if max_tokens == 0 {
            return Err(Error::param(max_name, "must be at least 1, got 0"));
        }
        let (temperature, temp_name) =
            same_setting("temperature", self.temperature, "temp", self.temp)?;
        let top_k = self.top_k.map(|k| count("top_k", k)).transpose()?;
        let mut warnings = Vec::new();
        let (temperature, top_k) = match self.do_sample {
            None => (temperature.unwrap_or(0.0), top_k.unwrap_or(0)),
            Some(false) => {
                let mut unused = Vec::new();
                if let Some(t) = temperature.filter(|&t| t != 0.0) {
                    unused.push(format!("{temp_name}={t}"));
                }
                if let Some(k) = top_k.filter(|&k| k != 0) {
                    unused.push(format!("top_k={k}"));
                }
                if self.top_p != 1.0 {
                    unused.push(format!("top_p={}", self.top_p));
                }
                if self.min_p != 0.0 {
                    unused.push(format!("min_p={}", self.min_p));
                }
                if !unused.is_empty() {
                    warnings.push(format!(
                        "do_sample=False decodes greedily, so {} only apply when sampling and are \
                         unused (as in transformers); pass do_sample=True to sample",
                        unused.join(", ")
                    ));
                }
                (0.0, top_k.unwrap_or(0))
            }
            Some(true) => match temperature {
                Some(0.0) => {
                    return Err(Error::param(
                        "do_sample",
                        format!(
                            "do_sample=True needs a {temp_name} above 0 ({temp_name}=0 is greedy decoding)"
                        ),
                    ))
                }
                t => (t.unwrap_or(1.0), top_k.unwrap_or(TRANSFORMERS_TOP_K)),
            },
        };
        let params = SamplingParams {
            temperature,
            top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            max_tokens,
            stop: self.stop,
            seed: SamplingParams::seed_from(self.seed)?,
            logprobs: self.logprobs.map(|n| count("logprobs", n)).transpose()?,
            ignore_eos: self.ignore_eos,
            constraint: self.constraint,
        };
        params.validate().map_err(|err| match err {
            // A temperature given as `temp` is reported as `temp`.
            Error::InvalidParam { param, message } if param == "temperature" => {
                Error::param(temp_name, message)
            }
            other => other,
        })?;
        Ok(ResolvedSampling { params, warnings })
    }
}

/// SplitMix64 (Steele et al., 2014): small, fast, and good enough to draw from a
/// categorical distribution; its whole state is the seed, so runs reproduce exactly.
#[derive(Debug, Clone)]
struct Rng(u64);

/// SplitMix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    /// The stream that starts at draw `index` of the one seeded with `seed` (SplitMix64
    /// can jump: its state is the seed plus a multiple of `GAMMA`).
    fn at(seed: u64, index: u64) -> Self {
        Rng(seed.wrapping_add(index.wrapping_mul(GAMMA)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process and per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Log-probabilities of a sampled token and of the most likely alternatives, from the
/// model's raw distribution (before penalties and truncation), as mlx-lm reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// Every draw is addressed by what it is for and the position of the token it
    /// decides, never by how many came before: a token is the same whatever the drafts
    /// around it, and a GPU can be handed the draw for a row without the sampler's state.
    seed: u64,
}

/// A distribution over the vocabulary, dense: each token's probability, summing to 1.
pub type Distribution = Vec<f32>;

/// The purposes of a draw (xored into the seed): a token's own, and a draft-model
/// speculative step's.
const SAMPLE_DRAW: u64 = 0x5851_F42D_4C95_7F2D;
const DRAFT_DRAW: u64 = 0xD1B5_4A32_D192_ED03;
const ACCEPT_DRAW: u64 = 0x8CB9_2BA7_2F3D_8DD7;
const RESIDUAL_DRAW: u64 = 0xAF25_1AF3_B0F0_25B5;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(fresh_seed);
        Sampler { params, seed }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits: [vocab]`, among the tokens `allowed` (a grammar's
    /// mask) when given. `context` is the prompt followed by the tokens generated so far;
    /// `prompt_len` splits the two, and `context.len()` is the position the token takes,
    /// which addresses its draw. Fails on NaN logits, which only a broken model produces.
    /// Log-probabilities are the model's own, before penalties and the mask.
    pub fn sample(
        &self,
        logits: &[f32],
        context: &[u32],
        prompt_len: usize,
        allowed: Option<&SimpleVob>,
    ) -> Result<(u32, Option<TokenLogprobs>)> {
        let adjusted = self.adjusted(logits, context, prompt_len, allowed)?;
        let token = if self.params.temperature == 0.0 {
            argmax(&adjusted)
        } else {
            let kept = self.candidates(&adjusted);
            kept.pick(self.draw(SAMPLE_DRAW, context.len()))
                .unwrap_or_else(|| argmax(&adjusted))
        };
        Ok((token, self.logprobs(logits, token)))
    }

    /// What a GPU pass needs to draw the token at `context.len()` itself, as
    /// [`Sampler::sample`] would without a grammar's mask (kernels.cu `sample_rows`).
    pub fn device_draw(&self, context: &[u32], prompt_len: usize) -> Draw {
        let p = &self.params;
        Draw {
            temperature: if p.temperature == 0.0 {
                0.0
            } else {
                p.temperature.max(MIN_TEMPERATURE)
            },
            // Above the vocabulary means all, as 0 does.
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p_floor: if p.min_p > 0.0 {
                min_p_floor(p.min_p)
            } else {
                0
            },
            draw: self.draw(SAMPLE_DRAW, context.len()),
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            penalized: self.penalized(context, prompt_len),
        }
    }

    /// The 64-bit draw for `purpose` at token `position`.
    fn draw(&self, purpose: u64, position: usize) -> u64 {
        Rng::at(self.seed ^ purpose, position as u64).next_u64()
    }

    /// Uniform in [0, 1): the draw for `purpose` at token `position`.
    fn uniform(&self, purpose: u64, position: usize) -> f64 {
        Rng::at(self.seed ^ purpose, position as u64).next_f64()
    }

    /// A draft model's proposal for the token at `position` from its `logits`
    /// (speculative decoding): greedy, their argmax (`None`: a certain proposal); else a
    /// token drawn from the distribution `sample` draws from, with the draw for that
    /// position, and that distribution.
    pub fn propose(
        &self,
        logits: &[f32],
        context: &[u32],
        prompt_len: usize,
        position: usize,
    ) -> Result<(u32, Option<Distribution>)> {
        let adjusted = self.adjusted(logits, context, prompt_len, None)?;
        if self.params.temperature == 0.0 {
            return Ok((argmax(&adjusted), None));
        }
        let kept = self.candidates(&adjusted);
        let token =
            (kept.pick(self.draw(DRAFT_DRAW, position))).unwrap_or_else(|| argmax(&adjusted));
        let mut q = vec![0.0f32; logits.len()];
        for (t, prob) in kept.probabilities() {
            q[t as usize] = prob as f32;
        }
        Ok((token, Some(q)))
    }

    /// The token at `position` from the target model's `logits`, given a draft model's
    /// proposal `draft` drawn from `q` (Leviathan et al. 2023, Chen et al. 2023): the
    /// draft is kept with probability `min(1, p(draft) / q(draft))`, where `p` is the
    /// distribution `sample` draws from; otherwise a token is drawn from `max(0, p - q)`,
    /// normalised. Either way the token follows `p` exactly. Every draw is addressed by
    /// `position`, so the token depends on the two models' distributions there and the
    /// seed only. Sampled requests only (greedy ones keep a draft when it is the argmax).
    pub fn verify(
        &self,
        logits: &[f32],
        context: &[u32],
        prompt_len: usize,
        position: usize,
        (draft, q): (u32, &[f32]),
    ) -> Result<(u32, Option<TokenLogprobs>)> {
        let adjusted = self.adjusted(logits, context, prompt_len, None)?;
        let p = self.candidates(&adjusted).probabilities();
        let q_of = |t: u32| q.get(t as usize).map_or(0.0, |&x| f64::from(x));
        let q_draft = q_of(draft);
        let p_draft = p.iter().find(|c| c.0 == draft).map_or(0.0, |c| c.1);
        let u = self.uniform(ACCEPT_DRAW, position);
        let token = if q_draft > 0.0 && u * q_draft < p_draft {
            draft
        } else {
            let residual: Vec<(u32, f64)> = p
                .iter()
                .map(|&(t, prob)| (t, (prob - q_of(t)).max(0.0)))
                .filter(|c| c.1 > 0.0)
                .collect();
            let total: f64 = residual.iter().map(|c| c.1).sum();
            // A rejection leaves mass wherever p exceeds q; none left (p == q up to
            // rounding) makes a rejection impossible in exact arithmetic: draw from p.
            let u = self.uniform(RESIDUAL_DRAW, position);
            if total > 0.0 {
                pick(&residual, u * total)
            } else {
                pick(&p, u)
            }
        };
        Ok((token, self.logprobs(logits, token)))
    }

    /// The logits after the mask and the penalties (what is drawn from), checked for NaN.
    fn adjusted<'a>(
        &self,
        logits: &'a [f32],
        context: &[u32],
        prompt_len: usize,
        allowed: Option<&SimpleVob>,
    ) -> Result<Cow<'a, [f32]>> {
        if any_nan(logits) {
            return Err(Error::Engine("the model produced NaN logits".into()));
        }
        let p = &self.params;
        if !p.is_penalized() && allowed.is_none() {
            return Ok(Cow::Borrowed(logits));
        }
        let mut logits = logits.to_vec();
        if let Some(mask) = allowed {
            grammar::apply_mask(mask, &mut logits);
            if logits.iter().all(|l| *l == f32::NEG_INFINITY) {
                return Err(Error::Grammar {
                    param: p.constraint_param().into(),
                    message: "no token the model can produce continues the output validly".into(),
                });
            }
        }
        self.apply_penalties(&mut logits, context, prompt_len);
        Ok(Cow::Owned(logits))
    }

    /// `token`'s log-probability and the top alternatives', from the raw `logits`, when
    /// the request asks for them.
    fn logprobs(&self, logits: &[f32], token: u32) -> Option<TokenLogprobs> {
        self.params.logprobs.map(|n| {
            let lp = log_softmax(logits);
            TokenLogprobs {
                logprob: lp[token as usize],
                top: top_n(&lp, n),
            }
        })
    }

    /// `(token, times generated)` of each distinct token a penalty changes: with a
    /// repetition penalty every token of `context`, else those generated (after
    /// `prompt_len`), with presence or frequency penalties.
    fn penalized(&self, context: &[u32], prompt_len: usize) -> Vec<(u32, u32)> {
        let p = &self.params;
        let mut counts: HashMap<u32, u32> = HashMap::new();
        if p.repetition_penalty != 1.0 {
            for &t in context {
                counts.entry(t).or_default();
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for &t in &context[prompt_len.min(context.len())..] {
                *counts.entry(t).or_default() += 1;
            }
        }
        counts.into_iter().collect()
    }

    /// The penalties on `logits`, token by token as kernels.cu `sample_rows` applies them:
    /// the repetition penalty divides a positive logit and multiplies a negative one
    /// (CTRL); presence and frequency penalties subtract `presence + frequency · count`
    /// from a generated token's.
    fn apply_penalties(&self, logits: &mut [f32], context: &[u32], prompt_len: usize) {
        let p = &self.params;
        let counted = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        for (t, n) in self.penalized(context, prompt_len) {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if p.repetition_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
            if counted && n > 0 {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
    }

    /// The candidates of softmax(logits / temperature) that top-k, then top-p, then min-p
    /// keep, with their integer weights, in vocabulary order. Defined so that `sample_rows`
    /// (kernels.cu) keeps the same set: top-k takes the largest logits, the first index
    /// among equals; top-p the shortest run of the heaviest weights, the first index among
    /// equals, whose weight reaches `ceil(top_p · total)`; min-p those weighing at least
    /// `ceil(min_p · 2^40)` (the most likely token weighs 2^40).
    fn candidates(&self, logits: &[f32]) -> Kept {
        let p = &self.params;
        let temperature = p.temperature.max(MIN_TEMPERATURE);
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        if p.top_k > 0 && p.top_k < idx.len() {
            let by_logit = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
            idx.sort_unstable();
        }
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut tokens: Vec<(u32, u64)> = idx
            .iter()
            .map(|&i| (i, weight((logits[i as usize] - max) / temperature)))
            .filter(|c| c.1 > 0)
            .collect();
        if p.top_p < 1.0 {
            let total: u64 = tokens.iter().map(|c| c.1).sum();
            let target = top_p_target(p.top_p, total);
            let mut order: Vec<(u64, u32)> = tokens.iter().map(|&(t, w)| (w, t)).collect();
            if let Some((w, t)) = top_p_last(&mut order, target) {
                tokens.retain(|c| c.1 > w || (c.1 == w && c.0 <= t));
            }
        }
        if p.min_p > 0.0 {
            let floor = min_p_floor(p.min_p);
            tokens.retain(|c| c.1 >= floor);
        }
        Kept { tokens }
    }
}

/// The last `(weight, token)` top-p keeps: in the order heaviest first, the first token
/// among equals, the one at which the running weight reaches `target` (the lightest when
/// none does). A selection by mass (quickselect: each round places one pivot and sums what
/// comes before it, then goes on in the half holding the cut), O(n) expected where a sort
/// of the whole vocabulary took 1.8 ms at 49,152. `order` is left permuted.
fn top_p_last(order: &mut [(u64, u32)], target: u64) -> Option<(u64, u32)> {
    let heaviest_first = |a: &(u64, u32), b: &(u64, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    let (mut lo, mut hi, mut before) = (0, order.len(), 0u64);
    // Invariant: the cut lies in order[lo..hi], and `before` weighs what precedes it.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (heavier, pivot, _) = order[lo..hi].select_nth_unstable_by(mid - lo, heaviest_first);
        let above = before + heavier.iter().map(|c| c.0).sum::<u64>();
        let pivot = *pivot;
        if above >= target {
            hi = mid;
        } else if above + pivot.0 >= target {
            return Some(pivot);
        } else {
            before = above + pivot.0;
            lo = mid + 1;
        }
    }
    // No run reaches the target (f64 rounding made it exceed the total): all are kept.
    order.iter().copied().max_by(heaviest_first)
}

/// The candidates a draw chooses from, in vocabulary order, with their weights.
#[derive(Debug)]
struct Kept {
    tokens: Vec<(u32, u64)>,
}

impl Kept {
    /// Their total weight: at most the vocabulary's size times 2^40, well within a u64.
    fn mass(&self) -> u64 {
        self.tokens.iter().map(|c| c.1).sum()
    }

    /// The token where the running weight, in vocabulary order, passes `draw · mass /
    /// 2^64`; `None` when nothing weighs anything (the logits held +∞).
    fn pick(&self, draw: u64) -> Option<u32> {
        let mut u = ((u128::from(draw) * u128::from(self.mass())) >> 64) as u64;
        for &(token, w) in &self.tokens {
            if u < w {
                return Some(token);
            }
            u -= w;
        }
        None
    }

    /// `(token, probability)` of each candidate.
    fn probabilities(&self) -> Vec<(u32, f64)> {
        let mass = self.mass() as f64;
        self.tokens
            .iter()
            .map(|&(t, w)| (t, w as f64 / mass))
            .collect()
    }
}

/// Bits of fraction in a weight: the most likely token weighs `2^WEIGHT_BITS`.
const WEIGHT_BITS: i32 = 40;

/// `2^f` for `f` in [-0.5, 0.5]: Taylor's coefficients, `ln(2)^k / k!` for k = 1..=7,
/// rounded to f32 (the next term is below 5e-9 of the value, under f32's rounding). Given
/// as bits, which kernels.cu `weight_value` spells the same.
const EXP2_COEFFS: [f32; 7] = [
    f32::from_bits(0x3f31_7218),
    f32::from_bits(0x3e75_fdf0),
    f32::from_bits(0x3d63_5847),
    f32::from_bits(0x3c1d_955b),
    f32::from_bits(0x3aae_c3ff),
    f32::from_bits(0x3921_8489),
    f32::from_bits(0x377f_e5fe),
];

/// Rounds an f32 below 2^22 in magnitude to an integer, ties to even, when added and
/// subtracted: at 1.5 · 2^23 an f32 has no fraction bits.
const ROUND: f32 = 12_582_912.0;

/// `floor(2^40 · e^x)` for `x ≤ 0`; 0 for NaN, −∞ and anything below `2^-72`. Every step
/// is one IEEE operation rounded to nearest (no fused multiply-add), so kernels.cu's
/// `weight_value` and `as_weight` give the same bits: `t = x · log2(e)`, split into an
/// integer `n` and `f = t − n` in [-0.5, 0.5], `2^f` by Horner's rule, times `2^(n + 40)`
/// (exact: a power of two, the product normal), rounded down.
fn weight(x: f32) -> u64 {
    let t = x * std::f32::consts::LOG2_E;
    if t.is_nan() || t < -72.0 {
        return 0;
    }
    let n = (t + ROUND) - ROUND;
    let f = t - n;
    let mut p = EXP2_COEFFS[6];
    for &c in EXP2_COEFFS[..6].iter().rev() {
        p = p * f + c;
    }
    p = p * f + 1.0;
    // n in [-72, 0]: 2^(n + 40) as an f32's exponent bits.
    let scale = f32::from_bits(((127 + n as i32 + WEIGHT_BITS) as u32) << 23);
    (p * scale) as u64
}

/// The weight top-p's run must reach: `ceil(top_p · total)` in f64, at least 1.
fn top_p_target(top_p: f32, total: u64) -> u64 {
    ((f64::from(top_p) * total as f64).ceil() as u64).max(1)
}

/// The least weight min-p keeps: `ceil(min_p · 2^40)`.
fn min_p_floor(min_p: f32) -> u64 {
    (f64::from(min_p) * (1u64 << WEIGHT_BITS) as f64).ceil() as u64
}

/// The token at `u` in the cumulative distribution of `cands` (`u` in [0, their total
/// probability)); the last one when rounding leaves `u` past the end.
fn pick(cands: &[(u32, f64)], mut u: f64) -> u32 {
    for &(token, q) in cands {
        if u < q {
            return token;
        }
        u -= q;
    }
    cands.last().map_or(0, |c| c.0)
}

/// Index of the largest logit, the first of equals (NaNs are passed over, and a NaN
/// first logit is the answer, as a scan keeping the first strictly larger value gives).
///
/// The largest value in 16 lanes, then the first index holding it: two passes that
/// vectorise, where one scan (a compare that each step depends on) took 28 µs for 49,152
/// logits (SmolLM2's vocabulary), ~2 % of a 64-sequence decode step. (`|`, not `||`:
/// a branch per logit would keep the loops scalar.)
#[allow(clippy::needless_bitwise_bool)]
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    if logits.first().is_none_or(|l| l.is_nan()) {
        return 0;
    }
    let (chunks, rest) = logits.as_chunks::<16>();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = m.max(l);
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let chunk = chunks
        .iter()
        .position(|c| c.iter().fold(false, |hit, &l| hit | (l == max)))
        .unwrap_or(chunks.len());
    let at = chunk * 16;
    let within = logits[at..].iter().position(|&l| l == max).unwrap_or(0);
    (at + within) as u32
}

/// Whether any logit is NaN: every logit checked (no early exit), which vectorises.
#[allow(clippy::needless_bitwise_bool)]
fn any_nan(logits: &[f32]) -> bool {
    logits.iter().fold(false, |nan, l| nan | l.is_nan())
}

/// `log(softmax(logits))`.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// The `n` largest entries as `(index, value)`, largest first.
fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]);
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, by_value);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by_value);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// The tokens top-k, then top-p, then min-p allow, computed independently of the
    /// sampler: probabilities at `temperature` in descending order, cut three ways.
    fn allowed(logits: &[f32], p: &SamplingParams) -> Vec<u32> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let t = f64::from(p.temperature.max(MIN_TEMPERATURE));
        let max = f64::from(logits[order[0]]);
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - max) / t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut keep = order.len();
        let mut cum = 0.0;
        for (i, x) in w.iter().enumerate() {
            cum += x / total;
            // Stop only once clearly past top_p: the sampler sums in f32, so within 1e-6
            // of the boundary it may keep one more token, and the reference must allow it.
            if cum >= f64::from(p.top_p) + 1e-6 {
                keep = i + 1;
                break;
            }
        }
        let floor = w[0] / total * f64::from(p.min_p);
        let by_min_p = w
            .iter()
            .take_while(|&&x| x / total >= floor * (1.0 - 1e-6))
            .count()
            .max(1);
        // Tokens tied in logit with an allowed one are also allowed (order among ties is free).
        let cut = keep.min(by_min_p);
        let last = logits[order[cut - 1]];
        order
            .iter()
            .enumerate()
            .filter(|&(i, &tok)| i < cut || logits[tok] == last)
            .map(|(_, &t)| t as u32)
            .collect()
    }

    /// The token `s` samples from `logits` at `position` (its draw's address; no penalty
    /// reads the context).
    fn at(s: &Sampler, logits: &[f32], position: usize) -> u32 {
        let context = vec![0; position];
        s.sample(logits, &context, position, None).unwrap().0
    }

    /// The first of `draws` samples that [`allowed`] excludes, with the allowed set.
    fn sampled_outside_allowed(
        logits: &[f32],
        p: SamplingParams,
        draws: usize,
    ) -> Option<(u32, Vec<u32>)> {
        let ok = allowed(logits, &p);
        let sampler = Sampler::new(p);
        (0..draws)
            .map(|position| at(&sampler, logits, position))
            .find(|t| !ok.contains(t))
            .map(|t| (t, ok))
    }

    proptest! {
        #[test]
        fn never_samples_an_excluded_token(
            logits in prop::collection::vec(-20.0f32..20.0, 2..64),
            temperature in 0.05f32..2.0,
            top_k in 0usize..10,
            top_p in 0.05f32..=1.0,
            min_p in 0.0f32..0.9,
            seed in any::<u64>(),
        ) {
            let mut p = params(temperature, top_k, top_p, min_p);
            p.seed = Some(seed);
            let outside = sampled_outside_allowed(&logits, p, 16);
            prop_assert!(outside.is_none(), "sampled (token, allowed) {:?}", outside);
        }

        #[test]
        fn same_seed_same_tokens(logits in prop::collection::vec(-5.0f32..5.0, 2..64), seed in any::<u64>()) {
            let mut p = params(1.0, 0, 1.0, 0.0);
            p.seed = Some(seed);
            let (a, b) = (Sampler::new(p.clone()), Sampler::new(p));
            for position in 0..8 {
                prop_assert_eq!(at(&a, &logits, position), at(&b, &logits, position));
            }
        }
    }

    /// A case the property test once found: the two best tokens sum to 1.4e-7 below top_p
    /// in f64, so the sampler (summing in f32) may keep a third.
    #[test]
    fn top_p_at_the_boundary_keeps_the_token_that_reaches_it() {
        let logits = [
            18.120813, 16.027048, 15.3587675, 16.637524, 19.156858, 15.016869, 19.446724,
        ];
        let mut p = params(0.6942769, 7, 0.9034171, 0.0);
        p.seed = Some(2084870319995941157);
        let outside = sampled_outside_allowed(&logits, p, 64);
        assert!(outside.is_none(), "sampled (token, allowed) {outside:?}");
    }

    proptest! {
        /// The two-pass argmax gives what one scan keeping the first strictly larger
        /// value gives: ties, infinities and NaNs included, at every length around the
        /// 16-lane chunks.
        #[test]
        fn argmax_is_the_first_of_the_largest(
            values in prop::collection::vec(crate::model::math::ties_and_specials(), 1..70)
        ) {
            let mut best = 0;
            for (i, &l) in values.iter().enumerate() {
                if l > values[best] {
                    best = i;
                }
            }
            prop_assert_eq!(argmax(&values), best as u32);
            prop_assert_eq!(any_nan(&values), values.iter().any(|l| l.is_nan()));
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let s = Sampler::new(SamplingParams::default());
        assert_eq!(at(&s, &[0.1, 3.0, -1.0, 2.9], 0), 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.25 and 0.75 at temperature 1.
        let logits = [0.0, 3f32.ln()];
        let s = Sampler::new(params(1.0, 0, 1.0, 0.0));
        let context = vec![0; 4000];
        let ones = (0..4000)
            .filter(|&i| s.sample(&logits, &context[..i], i, None).unwrap().0 == 1)
            .count();
        assert!((2800..3200).contains(&ones), "{ones} of 4000");
    }

    /// Speculative sampling with a draft model (draft drawn from `q`, kept with
    /// probability min(1, p/q), else a draw from the residual) gives tokens distributed as
    /// plain sampling's `p`, and keeps drafts at the rate sum_x min(p(x), q(x)): a
    /// chi-square test over a small vocabulary, with top-k cutting `p` and `q` differently.
    #[test]
    fn speculative_sampling_follows_the_target_distribution() {
        let target = [2.0f32, 1.0, 0.5, 0.0, -1.0, 1.5];
        let draft = [0.0f32, 2.0, 0.5, 1.0, 0.5, -2.0];
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 5,
            seed: Some(11),
            ..SamplingParams::default()
        };
        let s = Sampler::new(p.clone());
        let n = 40_000;
        let (mut counts, mut kept) = ([0usize; 6], 0);
        for position in 0..n {
            let (x, q) = s.propose(&draft, &[], 0, position).unwrap();
            let (token, _) = s
                .verify(&target, &[], 0, position, (x, &q.unwrap()))
                .unwrap();
            counts[token as usize] += 1;
            kept += usize::from(token == x);
        }
        let dist = |logits: &[f32]| {
            let mut d = [0.0f64; 6];
            (s.candidates(logits).probabilities())
                .iter()
                .for_each(|&(t, pr)| d[t as usize] = pr);
            d
        };
        let (pd, qd) = (dist(&target), dist(&draft));
        // Chi-square over the tokens p allows (5 degrees of freedom at most; 0.1 % level:
        // 20.5).
        let chi2: f64 = (0..6)
            .filter(|&t| pd[t] > 0.0)
            .map(|t| (counts[t] as f64 - n as f64 * pd[t]).powi(2) / (n as f64 * pd[t]))
            .sum();
        assert!(chi2 < 20.5, "chi-square {chi2}: {counts:?} against {pd:?}");
        assert_eq!(counts[4], 0, "top-k cut token 4 from p, and it was drawn");
        let rate: f64 = (0..6).map(|t| pd[t].min(qd[t])).sum();
        let seen = kept as f64 / n as f64;
        assert!((seen - rate).abs() < 0.015, "kept {seen}, expected {rate}");
    }

    /// The integer exponential is `2^40 · e^x` to f32's precision over the range that
    /// matters, and exact at 0.
    #[test]
    fn weight_is_the_exponential() {
        let mut term = 1.0f64;
        for (k, c) in EXP2_COEFFS.iter().enumerate() {
            term *= std::f64::consts::LN_2 / (k + 1) as f64;
            assert_eq!(*c, term as f32, "coefficient {}", k + 1);
        }
        assert_eq!(std::f32::consts::LOG2_E.to_bits(), 0x3fb8_aa3b);
        assert_eq!(weight(0.0), 1 << WEIGHT_BITS);
        assert_eq!(weight(-0.0), 1 << WEIGHT_BITS);
        assert_eq!(weight(f32::NEG_INFINITY), 0);
        assert_eq!(weight(f32::NAN), 0);
        assert_eq!(weight(-60.0), 0);
        for i in 0..200_000 {
            let x = -(i as f32) * 1.4e-4;
            let exact = (f64::from(x).exp()) * (1u64 << WEIGHT_BITS) as f64;
            let w = weight(x) as f64;
            // t = x · log2(e) is rounded once in f32: up to |t| · 2^-24 of relative error.
            let tolerance = exact * (2e-7 + f64::from(x.abs()) * 1e-7) + 1.0;
            assert!((w - exact).abs() <= tolerance, "x {x}: {w} against {exact}");
        }
    }

    /// The draw splits the mass exactly: two tokens of equal weight each take half of
    /// the 64-bit draws, the first the lower half; top-p's ties go to the first index.
    #[test]
    fn draws_and_ties_are_exact() {
        let s = Sampler::new(params(1.0, 0, 1.0, 0.0));
        let kept = s.candidates(&[1.0, f32::NEG_INFINITY, 1.0]);
        let half = 1u64 << 63;
        assert_eq!(kept.pick(half - 1), Some(0));
        assert_eq!(kept.pick(half + (half >> 20)), Some(2));
        let kept_of_three_equal = |p: SamplingParams| -> Vec<u32> {
            let kept = Sampler::new(p).candidates(&[0.5, 0.5, 0.5]);
            kept.tokens.iter().map(|c| c.0).collect()
        };
        // Top-p 0.5 needs two of them, the first two.
        assert_eq!(kept_of_three_equal(params(1.0, 0, 0.5, 0.0)), [0, 1]);
        // top-k 2 keeps the first two as well.
        assert_eq!(kept_of_three_equal(params(1.0, 2, 1.0, 0.0)), [0, 1]);
    }

    proptest! {
        /// The selection by mass finds the token a sort would: weights with many equals
        /// (few distinct values), every target from 1 to one past the total.
        #[test]
        fn top_p_selection_is_the_sorts(
            weights in prop::collection::vec(0u64..6, 1..80),
            fraction in 0.0f64..=1.0,
        ) {
            let mut order: Vec<(u64, u32)> =
                weights.iter().enumerate().map(|(i, &w)| (w + 1, i as u32)).collect();
            let total: u64 = order.iter().map(|c| c.0).sum();
            // Up to one past the total, which no run reaches.
            let target = ((fraction * (total + 1) as f64) as u64).clamp(1, total + 1);
            let mut sorted = order.clone();
            sorted.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut cum = 0;
            let want = sorted
                .iter()
                .copied()
                .find(|c| {
                    cum += c.0;
                    cum >= target
                })
                .or(sorted.last().copied());
            prop_assert_eq!(top_p_last(&mut order, target), want);
        }
    }

    #[test]
    fn penalties() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let s = Sampler::new(p);
        let mut logits = vec![4.0, -4.0, 1.0, 1.0];
        // Prompt [0, 1]; generated [2, 2].
        s.apply_penalties(&mut logits, &[0, 1, 2, 2], 2);
        assert_eq!(logits, vec![2.0, -8.0, 0.5 - 0.5 - 0.5, 1.0]);
    }

    #[test]
    fn nan_logits_fail_the_request() {
        let s = Sampler::new(SamplingParams::default());
        assert!(matches!(
            s.sample(&[0.0, f32::NAN], &[], 0, None),
            Err(Error::Engine(_))
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                max_tokens: 0,
                ..Default::default()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ];
        let fields = ["temperature", "top_p", "max_tokens", "stop"];
        for (p, field) in bad.iter().zip(fields) {
            match p.validate() {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    fn resolve(args: SamplingArgs) -> Result<ResolvedSampling> {
        args.resolve()
    }

    fn param_of(r: Result<ResolvedSampling>) -> String {
        match r {
            Err(Error::InvalidParam { param, .. }) => param,
            other => panic!("expected an invalid parameter, got {other:?}"),
        }
    }

    #[test]
    fn no_arguments_are_the_defaults() {
        let r = resolve(SamplingArgs::default()).unwrap();
        assert_eq!(r.params, SamplingParams::default());
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn aliases_merge_with_our_names() {
        let r = resolve(SamplingArgs {
            max_new_tokens: Some(7),
            temp: Some(0.5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.params.max_tokens, r.params.temperature), (7, 0.5));
        let same = resolve(SamplingArgs {
            max_tokens: Some(7),
            max_new_tokens: Some(7),
            temperature: Some(0.5),
            temp: Some(0.5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(same.params, r.params);
        let clash = SamplingArgs {
            max_tokens: Some(6),
            max_new_tokens: Some(5),
            ..Default::default()
        };
        assert_eq!(param_of(resolve(clash)), "max_new_tokens");
        let clash = SamplingArgs {
            temperature: Some(0.7),
            temp: Some(0.5),
            ..Default::default()
        };
        assert_eq!(param_of(resolve(clash)), "temp");
    }

    #[test]
    fn errors_name_the_argument_as_given() {
        for (args, name) in [
            (
                SamplingArgs {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                SamplingArgs {
                    max_new_tokens: Some(-2),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                SamplingArgs {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingArgs {
                    temp: Some(-1.0),
                    ..Default::default()
                },
                "temp",
            ),
            (
                SamplingArgs {
                    temperature: Some(3.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingArgs {
                    top_k: Some(-1),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingArgs {
                    do_sample: Some(true),
                    temperature: Some(0.0),
                    ..Default::default()
                },
                "do_sample",
            ),
        ] {
            assert_eq!(param_of(resolve(args)), name);
        }
    }

    #[test]
    fn do_sample_false_is_greedy_and_names_unused_settings() {
        let r = resolve(SamplingArgs {
            do_sample: Some(false),
            temperature: Some(0.7),
            top_p: 0.9,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.params.temperature, 0.0);
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("temperature=0.7"),
            "{:?}",
            r.warnings
        );
        assert!(r.warnings[0].contains("top_p=0.9"), "{:?}", r.warnings);
        let r = resolve(SamplingArgs {
            do_sample: Some(false),
            temp: Some(0.7),
            ..Default::default()
        })
        .unwrap();
        assert!(r.warnings[0].contains("temp=0.7"), "{:?}", r.warnings);
        // Nothing unused: nothing to say.
        for t in [None, Some(0.0)] {
            let r = resolve(SamplingArgs {
                do_sample: Some(false),
                temperature: t,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(r.params.temperature, 0.0);
            assert!(r.warnings.is_empty());
        }
    }

    #[test]
    fn do_sample_true_samples_as_transformers_does() {
        let r = resolve(SamplingArgs {
            do_sample: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (r.params.temperature, r.params.top_k),
            (1.0, TRANSFORMERS_TOP_K)
        );
        assert!(r.warnings.is_empty());
        let r = resolve(SamplingArgs {
            do_sample: Some(true),
            temp: Some(0.4),
            top_k: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.params.temperature, r.params.top_k), (0.4, 0));
        // Without do_sample, a temperature alone keeps our default of no top-k.
        let r = resolve(SamplingArgs {
            temperature: Some(0.8),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.params.top_k, 0);
    }
}
