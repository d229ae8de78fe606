//! Models: configuration, layers, the one decoder, and loading from files.

pub mod config;
pub mod decoder;
pub mod layers;
pub mod loader;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::{Decoder, KvCache};
pub use loader::{load, load_model, load_tokenizer, resolve_model_path, Model};
