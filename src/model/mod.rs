//! Models: the families and their adapters, configuration, layers, the one decoder, and
//! loading from GGUF files and safetensors folders (HF or MLX layout).

pub mod arch;
pub mod attention;
pub mod config;
pub mod decoder;
pub mod layers;
pub mod loader;
pub mod math;
pub mod ops;
pub mod profile;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::{Batch, Decoder, Draw, Logits};
pub use loader::{
    load, load_model, load_model_with, load_tokenizer, load_with, resolve_model_path, Model,
    SequenceCache,
};
