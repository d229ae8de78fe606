//! Generation: sampling and the one generation loop (the continuous-batching engine will
//! take over scheduling; this loop is the single place generation happens today).

pub mod generate;
pub mod sampling;

pub use generate::{generate, FinishReason, GenerationRequest, StepOutput, TokenLogprobs};
pub use sampling::{Sampler, SamplingParams};
