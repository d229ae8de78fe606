//! Cortex: run quantized language models fast on your own machine.
//!
//! The crate is plain Rust; the Python bindings live in [`py`] behind the `python` feature.
//! `formats` reads model files (validating them first), `model` holds the one decoder,
//! `tokenizer` turns text into ids and back, and `engine` samples and runs the one
//! generation loop.

pub mod bench;
pub mod convert;
pub mod engine;
pub mod error;
pub mod formats;
pub mod hub;
pub mod model;
pub mod progress;
pub mod quant;
pub mod threads;
pub mod tokenizer;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use model::{load, load_model, load_tokenizer, Model};
pub use tokenizer::Tokenizer;
