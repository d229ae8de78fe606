//! The inference engine, split as in vLLM: `request` (state machine, per-request sampling),
//! `kv` (block pool and the cache's memory), `scheduler` (FIFO admission, token budget,
//! preemption, and taking back each step's logits), `runner` (builds the batch, runs the
//! decoder), `core` (the engine thread: schedule → execute → update from output),
//! `client` (submitting, collecting and streaming for callers), `stats`, `sampling` and
//! `grammar` (constrained decoding), `saved` (prefixes saved to files).
//! Every generation — one streamed prompt or a thousand concurrent requests — runs through
//! [`Engine`].

pub mod client;
pub mod core;
pub mod grammar;
pub mod kv;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod saved;
pub mod scheduler;
pub mod stats;
#[cfg(test)]
pub mod testing;

pub use self::client::{Client, Completion, Generation, Next, SharedEngine, Stream};
pub use self::core::{Engine, EngineConfig, Speculative};
pub use request::{
    Event, FinishReason, Output, Request, RequestId, RequestState, Sink, StepOutput,
};
pub use sampling::{ResolvedSampling, Sampler, SamplingArgs, SamplingParams, TokenLogprobs};
pub use stats::Stats;
