//! Cortex: run quantized language models fast on your own machine.
//!
//! The crate is plain Rust; the Python bindings live in [`py`] behind the `python` feature.
//! `formats` reads and writes model files (validating what it reads first), `hub` fetches
//! them from the Hugging Face Hub, `model` holds the family adapters (`model::arch`) and
//! the one decoder (written against the device seam `model::ops`), `quant` the quantized
//! weight formats and their kernels, `tokenizer` turns text into ids and back, `engine`
//! schedules, runs and samples in the one generation loop (`engine::client` is its API),
//! `server` serves the engine over OpenAI's HTTP API, and `convert` turns a model into MLX
//! or GGUF files at the precision a recipe asks for. `docs/glossary.md` names the concepts.

pub mod bench;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod error;
pub mod formats;
pub mod hub;
pub mod model;
pub mod progress;
pub mod quant;
pub mod server;
pub mod threads;
pub mod tokenizer;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use model::{load, load_model, load_tokenizer, Model};
pub use tokenizer::Tokenizer;
