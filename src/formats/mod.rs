//! Model file formats: readers (and, with the converter, writers) that validate what they
//! read before anything else trusts it.

pub mod gguf;
