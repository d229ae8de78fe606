//! Affine group quantization with MLX's semantics (`mx.quantize` / `mx.dequantize`,
//! mode "affine"): each group of `group_size` consecutive values along a row is stored as
//! unsigned `bits`-bit codes `q` with a float `scale` and `bias`, and `w = scale * q + bias`.
//!
//! Packing (DESIGN §3): value `v` of a row sits at bit `v * bits` of the row's little-endian
//! byte stream. For 2/4/8 bits this is "uint32 words, least-significant value first"; 3 and
//! 5 bits put 8 values in 3 and 5 bytes, 6 bits 4 values in 3 bytes, each pack a
//! little-endian integer `Σ q_k << (k * bits)` — the same statement, byte by byte. A row of
//! `cols` values therefore takes `cols * bits / 32` uint32 words (`cols` is a multiple of
//! the group size, itself a multiple of 32).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

pub const SUPPORTED_BITS: &[u32] = &[2, 3, 4, 5, 6, 8];
pub const SUPPORTED_GROUP_SIZES: &[usize] = &[32, 64, 128];

/// Float type scales and biases are stored in (MLX uses the weight's own dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDType {
    F32,
    F16,
    BF16,
}

impl ScaleDType {
    /// Rounds an f32 to this type (round to nearest even, as MLX's casts do) and back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDType::F32 => x,
            ScaleDType::F16 => f16::from_f32(x).to_f32(),
            ScaleDType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }

    /// The safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            ScaleDType::F32 => "F32",
            ScaleDType::F16 => "F16",
            ScaleDType::BF16 => "BF16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            ScaleDType::F32 => 4,
            _ => 2,
        }
    }

    /// Little-endian bytes of `values` in this type.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ScaleDType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ScaleDType::F16 => values
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            ScaleDType::BF16 => values
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

/// Checks a bits / group size pair and that rows of `cols` values split into whole groups.
pub fn check_params(bits: u32, group_size: usize, cols: usize) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(Error::param(
            "bits",
            format!("{bits} is not supported (supported: {SUPPORTED_BITS:?})"),
        ));
    }
    if !SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Err(Error::param(
            "group_size",
            format!("{group_size} is not supported (supported: {SUPPORTED_GROUP_SIZES:?})"),
        ));
    }
    if cols == 0 || !cols.is_multiple_of(group_size) {
        return Err(Error::param(
            "group_size",
            format!("rows of {cols} values do not split into groups of {group_size}"),
        ));
    }
    Ok(())
}

/// A `[rows, cols]` matrix in MLX's affine layout. Scales and biases are held as f32 values
/// that are exactly representable in `scale_dtype` (what the file stores).
#[derive(Debug, Clone)]
pub struct AffineMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    /// `[rows, cols * bits / 32]`.
    pub packed: Vec<u32>,
    /// `[rows, cols / group_size]` each.
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
    pub scale_dtype: ScaleDType,
}

/// Scale and bias of one group, exactly as MLX's CPU `quantize` computes them (f32
/// arithmetic, `rint`): the scale is negative when the maximum dominates, so that the edge
/// with the larger magnitude maps to code 0 and is reproduced exactly, and the bias is that
/// edge (or 0 when the edge rounds to code 0), which keeps 0.0 exact.
fn group_params(values: &[f32], n_bins: f32) -> (f32, f32) {
    let mut w_min = f32::INFINITY;
    let mut w_max = f32::NEG_INFINITY;
    for &v in values {
        w_max = w_max.max(v);
        w_min = w_min.min(v);
    }
    let mask = w_min.abs() > w_max.abs();
    let mut scale = ((w_max - w_min) / n_bins).max(1e-7);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    if q0 == 0.0 {
        (scale, 0.0)
    } else {
        (edge / q0, edge)
    }
}

impl AffineMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix, bit-exact with `mx.quantize` for
    /// inputs of dtype `scale_dtype` (codes are chosen with the f32 scale; only the stored
    /// scale and bias are rounded to `scale_dtype`, as in MLX).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        scale_dtype: ScaleDType,
    ) -> Result<Self> {
        check_params(bits, group_size, cols)?;
        if w.len() != rows * cols {
            return Err(Error::param(
                "weights",
                format!("{} values for a [{rows}, {cols}] matrix", w.len()),
            ));
        }
        let n_bins = ((1u32 << bits) - 1) as f32;
        Self::from_rows(
            w,
            cols,
            (rows, cols, bits, group_size, scale_dtype),
            |row, codes, scales, biases| {
                for (g, chunk) in row.chunks(group_size).enumerate() {
                    let (scale, bias) = group_params(chunk, n_bins);
                    for (c, &v) in codes[g * group_size..].iter_mut().zip(chunk) {
                        *c = ((v - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u8;
                    }
                    scales[g] = scale_dtype.round(scale);
                    biases[g] = scale_dtype.round(bias);
                }
            },
        )
    }

    /// A `[rows, cols]` matrix (`shape`: rows, cols, bits, group size, scale dtype) built
    /// row by row in parallel: `fill(row, codes, scales, biases)` writes one row's `cols`
    /// codes and its groups' scales and biases from the row's `row_len` elements of `src`
    /// (floats to quantize, or GGML blocks to rewrite).
    pub fn from_rows<T: Sync>(
        src: &[T],
        row_len: usize,
        shape: (usize, usize, u32, usize, ScaleDType),
        fill: impl Fn(&[T], &mut [u8], &mut [f32], &mut [f32]) + Sync + Send,
    ) -> Result<Self> {
        let (rows, cols, bits, group_size, scale_dtype) = shape;
        check_params(bits, group_size, cols)?;
        let words = cols * bits as usize / 32;
        let groups = cols / group_size;
        let mut packed = vec![0u32; rows * words];
        let mut scales = vec![0f32; rows * groups];
        let mut biases = vec![0f32; rows * groups];
        packed
            .par_chunks_mut(words)
            .zip(scales.par_chunks_mut(groups))
            .zip(biases.par_chunks_mut(groups))
            .zip(src.par_chunks(row_len))
            .for_each_init(
                || vec![0u8; cols],
                |codes, (((packed, scales), biases), row)| {
                    fill(row, codes, scales, biases);
                    pack_row(codes, bits, packed);
                },
            );
        Self::from_parts(
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales,
            biases,
            scale_dtype,
        )
    }

    /// Builds a matrix from stored parts, checking every length against the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        scale_dtype: ScaleDType,
    ) -> Result<Self> {
        check_params(bits, group_size, cols)?;
        let words = cols * bits as usize / 32;
        let groups = cols / group_size;
        if packed.len() != rows * words
            || scales.len() != rows * groups
            || biases.len() != rows * groups
        {
            return Err(Error::param(
                "weights",
                format!(
                    "packed/scales/biases of {}/{}/{} values do not fit [{rows}, {cols}] at {bits} bits, group {group_size}",
                    packed.len(),
                    scales.len(),
                    biases.len()
                ),
            ));
        }
        Ok(AffineMatrix {
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales,
            biases,
            scale_dtype,
        })
    }

    pub fn words_per_row(&self) -> usize {
        self.cols * self.bits as usize / 32
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Codes of row `r`.
    pub fn codes(&self, r: usize) -> Vec<u8> {
        let words = self.words_per_row();
        let mut codes = vec![0u8; self.cols];
        unpack_row(
            &self.packed[r * words..(r + 1) * words],
            self.bits,
            &mut codes,
        );
        codes
    }

    /// Row `r` as f32: `scale * q + bias` per group (what `mx.dequantize` computes).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let groups = self.groups_per_row();
        let codes = self.codes(r);
        for (g, (o, q)) in out
            .chunks_mut(self.group_size)
            .zip(codes.chunks(self.group_size))
            .enumerate()
        {
            let (s, b) = (self.scales[r * groups + g], self.biases[r * groups + g]);
            for (o, &q) in o.iter_mut().zip(q) {
                *o = s * f32::from(q) + b;
            }
        }
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// Writes value `i` of a packed row (at bit `i * bits`) as `from(code)` into `out[i]`; the
/// power-of-two widths, whose values never straddle a word, get a loop per width.
#[inline(always)]
fn unpack_into<T>(packed: &[u32], bits: u32, out: &mut [T], from: impl Fn(u32) -> T) {
    #[inline(always)]
    fn words<const BITS: u32, T>(packed: &[u32], out: &mut [T], from: impl Fn(u32) -> T) {
        let mask = (1u32 << BITS) - 1;
        for (w, o) in packed
            .iter()
            .zip(out.chunks_exact_mut((32 / BITS) as usize))
        {
            for (k, o) in o.iter_mut().enumerate() {
                *o = from((w >> (BITS as usize * k)) & mask);
            }
        }
    }
    match bits {
        2 => words::<2, T>(packed, out, from),
        4 => words::<4, T>(packed, out, from),
        8 => words::<8, T>(packed, out, from),
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut bit = 0usize;
            for o in out.iter_mut() {
                let lo = u64::from(packed[bit / 32]);
                let hi = packed.get(bit / 32 + 1).map_or(0, |&w| u64::from(w));
                *o = from((((lo | hi << 32) >> (bit % 32)) & mask) as u32);
                bit += bits as usize;
            }
        }
    }
}

/// Packs `codes` (each `< 2^bits`) into `out` (`codes.len() * bits / 32` words).
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u32]) {
    out.fill(0);
    let mut bit = 0usize;
    for &c in codes {
        let v = u64::from(c) << (bit % 32);
        out[bit / 32] |= v as u32;
        if bit % 32 + bits as usize > 32 {
            out[bit / 32 + 1] |= (v >> 32) as u32;
        }
        bit += bits as usize;
    }
}

/// The inverse of [`pack_row`]: fills `codes` from `packed`.
pub fn unpack_row(packed: &[u32], bits: u32, codes: &mut [u8]) {
    unpack_into(packed, bits, codes, |c| c as u8);
}

/// MLX's 2, 4 or 8-bit codes rearranged for dp4a (the GPU's q8 GEMV and GEMM, kernels.cu
/// `chunk_dot`): within each u32 word, code `i` moves from bit `bits·i` to bit
/// `8·(i % 4) + bits·(i / 4)`, so that `(word >> bits·s) & mask` holds codes `4s..4s+3`,
/// one per byte.
pub fn int_layout(packed: &[u32], bits: u32) -> Vec<u32> {
    use rayon::prelude::*;
    let per_word = 32 / bits;
    let mask = (1u32 << bits) - 1;
    packed
        .par_iter()
        .map(|&w| {
            (0..per_word).fold(0u32, |out, i| {
                out | ((w >> (bits * i)) & mask) << (8 * (i % 4) + bits * (i / 4))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Each byte of `(word >> bits·s) & mask` is the next code, as the GPU reads them.
        #[test]
        fn int_layout_puts_four_codes_a_shift(bits_i in 0usize..3, seed in any::<u64>()) {
            let bits = [2u32, 4, 8][bits_i];
            let mut s = seed;
            let codes: Vec<u8> = (0..64).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as u8) & ((1u16 << bits) - 1) as u8
            }).collect();
            let mut packed = vec![0u32; 64 * bits as usize / 32];
            pack_row(&codes, bits, &mut packed);
            let mask = u32::from_ne_bytes([((1u16 << bits) - 1) as u8; 4]);
            let read: Vec<u8> = int_layout(&packed, bits)
                .iter()
                .flat_map(|&w| (0..8 / bits).flat_map(move |s| ((w >> (bits * s)) & mask).to_le_bytes()))
                .collect();
            prop_assert_eq!(read, codes);
        }
        #[test]
        fn pack_unpack_round_trip(bits_i in 0usize..6, groups in 1usize..4, seed in any::<u64>()) {
            let bits = SUPPORTED_BITS[bits_i];
            let n = groups * 32;
            let mut s = seed;
            let codes: Vec<u8> = (0..n).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as u8) & ((1u16 << bits) - 1) as u8
            }).collect();
            let mut packed = vec![0u32; n * bits as usize / 32];
            pack_row(&codes, bits, &mut packed);
            let mut back = vec![0u8; n];
            unpack_row(&packed, bits, &mut back);
            prop_assert_eq!(codes, back);
        }
    }

    #[test]
    fn zero_and_the_dominant_edge_are_exact() {
        let mut w: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.013).collect();
        w[5] = 0.0;
        let a = AffineMatrix::quantize(&w, 1, 64, 4, 64, ScaleDType::F32).unwrap();
        let d = a.dequantize();
        assert_eq!(d[5], 0.0);
        assert_eq!(d[63], w[63]); // |max| > |min|: the maximum is the bias
    }
}
