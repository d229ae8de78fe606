//! Model file formats: readers that validate what they read before anything else trusts
//! it, and the writers the converter uses.

pub mod gguf;
pub mod safetensors;
