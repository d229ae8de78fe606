//! The one generation loop: prefill the prompt, then sample, detokenize, check stop
//! conditions and decode one token at a time, reporting each step to the caller. Python's
//! `generate` / `stream_generate`, the CLI and the benchmark all run through [`generate`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::{StreamDecoder, Tokenizer};

pub use super::sampling::TokenLogprobs;
use super::sampling::{Sampler, SamplingParams};

/// Prompt tokens per forward pass during prefill. Bounds how long a cancellation waits
/// (one chunk) at little cost: matmuls of 64 rows already run at full speed.
pub const PREFILL_CHUNK: usize = 64;

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one step of generation produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Text completed by this step (may be empty while a character or a possible stop
    /// string is incomplete). All steps' texts concatenate to the generated text.
    pub text: String,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    /// Prompt tokens per second of prefill.
    pub prompt_tps: f64,
    /// Generated tokens per second since prefill ended.
    pub generation_tps: f64,
}

/// Holds back generated text that could be the start of a stop string, and cuts the text
/// at the first stop string found (which may span several tokens).
struct StopMatcher<'a> {
    stops: &'a [String],
    held: String,
}

impl StopMatcher<'_> {
    /// Adds `piece`; returns the text now safe to emit and whether a stop string ended it.
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string: earlier text
        // can no longer be part of a match.
        let keep = self
            .stops
            .iter()
            .filter_map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let out: String = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    /// Text still held when generation ends for another reason.
    fn release(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Generates from `request.prompt`, calling `emit` after every token; `emit` returns
/// false when the caller wants no more. `cancel` is checked between forward passes, and a
/// set flag ends the loop with [`Error::Cancelled`].
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    request: &GenerationRequest,
    cancel: &AtomicBool,
    mut emit: impl FnMut(StepOutput) -> bool,
) -> Result<()> {
    let GenerationRequest { prompt, params } = request;
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::param("prompt", "the prompt is empty"));
    }
    let context_length = model.config.max_position_embeddings;
    if prompt.len() >= context_length {
        return Err(Error::ContextLength {
            prompt_tokens: prompt.len(),
            context_length,
        });
    }

    let start = Instant::now();
    let mut cache = model.new_cache();
    let mut logits = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        logits = Some(model.forward(chunk, &mut cache, false)?);
    }
    let mut logits = logits.ok_or_else(|| Error::Engine("prefill produced no logits".into()))?;
    let prefill_end = Instant::now();
    let prompt_tps = prompt.len() as f64 / (prefill_end - start).as_secs_f64().max(1e-9);

    let mut sampler = Sampler::new(params.clone());
    let mut context = prompt.clone();
    let mut detok = StreamDecoder::new();
    let mut stops = StopMatcher {
        stops: &params.stop,
        held: String::new(),
    };
    for n in 1.. {
        let row = logits.flatten_all()?.to_vec1::<f32>()?; // [vocab]
        let (token, logprobs) = sampler.sample(&row, &context, prompt.len())?;
        context.push(token);
        let eos = !params.ignore_eos && tokenizer.eos_token_ids.contains(&token);
        let mut text = String::new();
        let mut finish = None;
        if !eos {
            let (safe, hit) = stops.push(&detok.push(tokenizer, token)?);
            text = safe;
            finish = hit.then_some(FinishReason::Stop);
        }
        // The next forward pass would put a token at position cache.len().
        let length = n >= params.max_tokens || cache.len() >= context_length;
        if finish.is_none() && (eos || length) {
            let (safe, hit) = stops.push(&detok.flush(tokenizer)?);
            text.push_str(&safe);
            if !hit {
                text.push_str(&stops.release());
            }
            finish = Some(if eos || hit {
                FinishReason::Stop
            } else {
                FinishReason::Length
            });
        }
        let step = StepOutput {
            text,
            token,
            logprobs,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            generation_tokens: n,
            prompt_tps,
            generation_tps: n as f64 / prefill_end.elapsed().as_secs_f64().max(1e-9),
        };
        if !emit(step) || finish.is_some() {
            return Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        logits = model.forward(&[token], &mut cache, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher {
            stops: &stops,
            held: String::new(),
        };
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.release());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".to_string(), true)
        );
        assert_eq!(
            run(&["\n\n"], &["one\n", "\ntwo"]),
            ("one".to_string(), true)
        );
    }

    #[test]
    fn partial_match_is_released() {
        assert_eq!(
            run(&["END"], &["abc E", "N"]),
            ("abc EN".to_string(), false)
        );
        assert_eq!(run(&["xyz"], &["é", "ü"]), ("éü".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b c", "a"], &["x a b c"]), ("x ".to_string(), true));
    }
}
