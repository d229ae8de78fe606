//! GGML block types that are exactly MLX affine groups of 32, and the conversions between
//! the two layouts that lose nothing:
//!
//! | GGML | block (bytes) | as affine, group 32 |
//! |------|---------------|---------------------|
//! | Q4_0 | f16 d, 16 × two nibbles | bits 4, scale d, bias −8d |
//! | Q4_1 | f16 d, f16 m, 16 × two nibbles | bits 4, scale d, bias m |
//! | Q5_0 | f16 d, u32 high bits, 16 × two nibbles | bits 5, scale d, bias −16d |
//! | Q5_1 | f16 d, f16 m, u32 high bits, 16 × two nibbles | bits 5, scale d, bias m |
//! | Q8_0 | f16 d, 32 × i8 | bits 8, scale d, bias −128d (code = q + 128) |
//!
//! Within a block, byte `j` of the nibbles holds value `j` (low nibble) and value `j + 16`
//! (high nibble); bit `j` of the high-bit word is bit 4 of value `j`. The biases −8d, −16d
//! and −128d are exact in f16 and `d·q + bias` equals GGML's `d·(q − offset)` exactly in
//! f32, so dequantized weights are bit-identical both ways. Scales and biases are f16.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::affine::{pack_row, unpack_row, AffineMatrix, ScaleDType};
use crate::error::Result;

const BLOCK: usize = 32;

/// Affine bits of a GGML type that converts losslessly, `None` for the others.
pub fn affine_bits(dtype: GgmlDType) -> Option<u32> {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => Some(4),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => Some(5),
        GgmlDType::Q8_0 => Some(8),
        _ => None,
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes one block into 32 codes plus scale and bias.
fn decode_block(dtype: GgmlDType, b: &[u8], codes: &mut [u8]) -> (f32, f32) {
    let d = half_at(b, 0);
    let nibbles = |qs: &[u8], codes: &mut [u8]| {
        for j in 0..16 {
            codes[j] = qs[j] & 0xF;
            codes[j + 16] = qs[j] >> 4;
        }
    };
    let high_bits = |qh: u32, codes: &mut [u8]| {
        for (j, c) in codes.iter_mut().enumerate() {
            *c |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    match dtype {
        GgmlDType::Q4_0 => {
            nibbles(&b[2..18], codes);
            (d, -8.0 * d)
        }
        GgmlDType::Q4_1 => {
            nibbles(&b[4..20], codes);
            (d, half_at(b, 2))
        }
        GgmlDType::Q5_0 => {
            nibbles(&b[6..22], codes);
            high_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), codes);
            (d, -16.0 * d)
        }
        GgmlDType::Q5_1 => {
            nibbles(&b[8..24], codes);
            high_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), codes);
            (d, half_at(b, 2))
        }
        GgmlDType::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                *c = (i16::from(q as i8) + 128) as u8;
            }
            (d, -128.0 * d)
        }
        _ => unreachable!("decode_block is only called for types affine_bits accepts"),
    }
}

/// Rewrites a `[rows, cols]` tensor of GGML blocks as an affine matrix with group 32, or
/// `None` when the type is not one of the five above.
pub fn to_affine(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<AffineMatrix>> {
    let Some(bits) = affine_bits(dtype) else {
        return Ok(None);
    };
    let block_bytes = dtype.type_size();
    let blocks = cols / BLOCK;
    let words = cols * bits as usize / 32;
    let mut packed = vec![0u32; rows * words];
    let mut scales = vec![0f32; rows * blocks];
    let mut biases = vec![0f32; rows * blocks];
    packed
        .par_chunks_mut(words)
        .zip(scales.par_chunks_mut(blocks))
        .zip(biases.par_chunks_mut(blocks))
        .zip(data.par_chunks(blocks * block_bytes))
        .for_each_init(
            || vec![0u8; cols],
            |codes, (((packed, scales), biases), row)| {
                for (g, b) in row.chunks(block_bytes).enumerate() {
                    let (s, bias) = decode_block(dtype, b, &mut codes[g * BLOCK..(g + 1) * BLOCK]);
                    scales[g] = s;
                    biases[g] = bias;
                }
                pack_row(codes, bits, packed);
            },
        );
    AffineMatrix::from_parts(
        rows,
        cols,
        bits,
        BLOCK,
        packed,
        scales,
        biases,
        ScaleDType::F16,
    )
    .map(Some)
}

/// Writes an affine matrix as GGML blocks when that loses nothing: group 32, 4 or 5 bits
/// (as Q4_1 / Q5_1), scales and biases exact in f16. `None` otherwise.
pub fn from_affine(a: &AffineMatrix) -> Option<(GgmlDType, Vec<u8>)> {
    let dtype = match (a.bits, a.group_size) {
        (4, BLOCK) => GgmlDType::Q4_1,
        (5, BLOCK) => GgmlDType::Q5_1,
        _ => return None,
    };
    let f16_exact = |x: &f32| f16::from_f32(*x).to_f32() == *x;
    if !a.scales.iter().all(f16_exact) || !a.biases.iter().all(f16_exact) {
        return None;
    }
    let blocks = a.groups_per_row();
    let mut out = Vec::with_capacity(a.rows * blocks * dtype.type_size());
    let mut codes = vec![0u8; a.cols];
    for r in 0..a.rows {
        unpack_row(
            &a.packed[r * a.words_per_row()..(r + 1) * a.words_per_row()],
            a.bits,
            &mut codes,
        );
        for g in 0..blocks {
            let c = &codes[g * BLOCK..(g + 1) * BLOCK];
            out.extend(f16::from_f32(a.scales[r * blocks + g]).to_le_bytes());
            out.extend(f16::from_f32(a.biases[r * blocks + g]).to_le_bytes());
            if a.bits == 5 {
                let qh = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |h, (j, &q)| h | (u32::from(q >> 4) << j));
                out.extend(qh.to_le_bytes());
            }
            out.extend((0..16).map(|j| (c[j] & 0xF) | (c[j + 16] & 0xF) << 4));
        }
    }
    Some((dtype, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every lossless type: candle's quantizer makes the blocks, candle's dequantizer is
    /// the reference, and the affine form must reproduce it bit for bit (and go back to
    /// identical blocks for Q4_1 / Q5_1).
    #[test]
    fn ggml_blocks_are_affine_groups() {
        let (rows, cols) = (3, 96);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes = q.data().unwrap();
            let a = to_affine(dtype, &bytes, rows, cols).unwrap().unwrap();
            assert_eq!(a.dequantize(), want, "{dtype:?}");
            if let Some((back_type, back)) = from_affine(&a) {
                if back_type == dtype {
                    assert_eq!(back, bytes.as_ref(), "{dtype:?}");
                }
            }
        }
    }
}
