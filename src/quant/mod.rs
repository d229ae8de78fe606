//! Quantization: MLX's affine group quantization (`affine`) and its correspondence with
//! GGML block types (`ggml`).

pub mod affine;
pub mod ggml;
pub mod kernels;

pub use affine::{AffineMatrix, ScaleDType};
pub use kernels::{Isa, PackedMatrix};
