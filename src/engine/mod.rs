//! The inference engine, split as in vLLM: `request` (state machine, per-request sampling),
//! `kv_cache` (block pool and block tables), `scheduler` (FIFO admission, token budget,
//! preemption), `runner` (builds the batch, runs the decoder), `core` (the engine thread:
//! schedule → execute → update), `stats` and `sampling`. Every generation — one streamed
//! prompt or a thousand concurrent requests — runs through [`Engine`].

pub mod core;
pub mod kv_cache;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod stats;

pub use self::core::{Engine, EngineConfig};
pub use request::{Event, FinishReason, Output, Request, RequestId, RequestState, StepOutput};
pub use sampling::{ResolvedSampling, Sampler, SamplingArgs, SamplingParams, TokenLogprobs};
pub use stats::Stats;
