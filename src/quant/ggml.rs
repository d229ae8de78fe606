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
//! | Q4_K | 256 values: f16 d, f16 dmin, 8 × (6-bit sc, 6-bit m), 128 × two nibbles | bits 4, scale d·sc, bias −dmin·m, per 32 |
//! | Q5_K | as Q4_K, plus 32 bytes of fifth bits | bits 5, scale d·sc, bias −dmin·m, per 32 |
//!
//! Within a block, byte `j` of the nibbles holds value `j` (low nibble) and value `j + 16`
//! (high nibble); bit `j` of the high-bit word is bit 4 of value `j`. The biases −8d, −16d
//! and −128d are exact in f16 and `d·q + bias` equals GGML's `d·(q − offset)` exactly in
//! f32, so dequantized weights are bit-identical both ways. Their scales and biases are f16.
//!
//! A K-quant super-block of 256 values is eight groups of 32 (llama.cpp's `get_scale_min_k4`
//! unpacks each group's 6-bit scale and min): byte `l` of the nibbles of 64 values holds
//! value `l` of the even group (low nibble) and of the odd group (high nibble); for Q5_K, bit
//! `g` of byte `l` of the fifth bits is bit 4 of value `l` of group `g`. GGML computes `d1 =
//! d·sc` and `m1 = dmin·m` in f32, exactly (an f16 times a 6-bit integer), and then `d1·q −
//! m1`: the affine scale `d1` and bias `−m1` give the same values. They are not exact in f16,
//! so as MLX affine groups (`to_affine`, for the converter) they are f32; our kernels keep
//! the blocks' two levels instead (`to_super_blocks`: an int8 a group times an f16 a
//! super-block, 4.6 and 5.6 bits a weight), and run Q2_K, Q3_K and Q6_K, whose groups are
//! 16 values, the same way (layouts at [`to_super_blocks`]).

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::affine::{unpack_row, AffineMatrix, ScaleDType};
use super::kernels::{Levels, PackedMatrix, SuperBlocks, SUPER};
use crate::error::{Error, Result};

const BLOCK: usize = 32;

/// Affine bits of a GGML type that converts losslessly, `None` for the others.
pub fn affine_bits(dtype: GgmlDType) -> Option<u32> {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => Some(4),
        GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => Some(5),
        GgmlDType::Q8_0 => Some(8),
        _ => None,
    }
}

fn is_k_quant(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K)
}

fn half_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

/// Decodes one block into 32 codes plus scale and bias.
fn decode_block(dtype: GgmlDType, b: &[u8], codes: &mut [u8]) -> (f32, f32) {
    let d = half_at(b, 0).to_f32();
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
            (d, half_at(b, 2).to_f32())
        }
        GgmlDType::Q5_0 => {
            nibbles(&b[6..22], codes);
            high_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), codes);
            (d, -16.0 * d)
        }
        GgmlDType::Q5_1 => {
            nibbles(&b[8..24], codes);
            high_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), codes);
            (d, half_at(b, 2).to_f32())
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

/// Group `g`'s (scale, min) of a K-quant super-block's 12 bytes of 6-bit pairs (llama.cpp's
/// `get_scale_min_k4`): groups 0–3 in the low 6 bits of bytes 0–3 and 4–7, groups 4–7 in
/// the nibbles of bytes 8–11 with their top 2 bits in the spare bits of bytes 0–7.
fn scale_min_k4(g: usize, q: &[u8]) -> (u8, u8) {
    if g < 4 {
        (q[g] & 63, q[g + 4] & 63)
    } else {
        (
            (q[g + 4] & 0xF) | ((q[g - 4] >> 6) << 4),
            (q[g + 4] >> 4) | ((q[g] >> 6) << 4),
        )
    }
}

/// Decodes one Q4_K / Q5_K super-block into 256 codes; returns `d`, `dmin` and the 8
/// groups' 6-bit scales and mins (weights `d · sc · q − dmin · m`).
fn decode_super(dtype: GgmlDType, b: &[u8], codes: &mut [u8]) -> (f16, f16, [u8; 8], [u8; 8]) {
    let pairs = &b[4..16];
    let (high, nibbles) = match dtype {
        GgmlDType::Q5K => (Some(&b[16..48]), &b[48..176]),
        _ => (None, &b[16..144]),
    };
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for g in 0..8 {
        (sc[g], m[g]) = scale_min_k4(g, pairs);
        let shift = 4 * (g % 2);
        for (l, &byte) in nibbles[32 * (g / 2)..32 * (g / 2) + 32].iter().enumerate() {
            let fifth = high.map_or(0, |h| (h[l] >> g & 1) << 4);
            codes[BLOCK * g + l] = (byte >> shift & 0xF) | fifth;
        }
    }
    (half_at(b, 0), half_at(b, 2), sc, m)
}

/// Rewrites a `[rows, cols]` tensor of GGML blocks as an affine matrix with group 32, or
/// `None` when the type is not one of those above.
pub fn to_affine(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<AffineMatrix>> {
    let Some(bits) = affine_bits(dtype) else {
        return Ok(None);
    };
    let (block_bytes, block_values) = (dtype.type_size(), dtype.block_size());
    if !cols.is_multiple_of(block_values) || data.len() != rows * cols / block_values * block_bytes
    {
        return Err(Error::param(
            "weights",
            format!(
                "{} bytes of {dtype:?} blocks do not fit [{rows}, {cols}]",
                data.len()
            ),
        ));
    }
    let scale_dtype = if is_k_quant(dtype) {
        ScaleDType::F32
    } else {
        ScaleDType::F16
    };
    AffineMatrix::from_rows(
        data,
        cols / block_values * block_bytes,
        (rows, cols, bits, BLOCK, scale_dtype),
        |row, codes, scales, biases| {
            for (i, b) in row.chunks(block_bytes).enumerate() {
                let values = i * block_values..(i + 1) * block_values;
                if is_k_quant(dtype) {
                    let first = values.start / BLOCK;
                    let (d, dmin, sc, m) = decode_super(dtype, b, &mut codes[values]);
                    for g in 0..8 {
                        scales[first + g] = d.to_f32() * f32::from(sc[g]);
                        biases[first + g] = -(dmin.to_f32() * f32::from(m[g]));
                    }
                } else {
                    let (s, bias) = decode_block(dtype, b, &mut codes[values]);
                    scales[i] = s;
                    biases[i] = bias;
                }
            }
        },
    )
    .map(Some)
}

/// One super-block of a k-quant in groups of 16, as its codes and levels: what
/// [`to_super_blocks`] reads and [`to_ggml`] writes. Layouts (llama.cpp's
/// `dequantize_row_q*_K`): value `v = 128n + 32j + 16s + l` (`n < 2` halves, `j < 4`,
/// `s < 2`, `l < 16`) is in group `v / 16`, and
///
/// | type | bytes | value |
/// |------|-------|-------|
/// | Q6_K | 128 bytes of low nibbles, 64 of top crumbs, 16 int8 `sc`, f16 `d` | `d · sc · (q − 32)`; `q`'s low nibble in byte `64n + 32 (j % 2) + 16s + l` (high nibble for `j ≥ 2`), its top 2 bits at bits `2j` of byte `128 + 32n + 16s + l` |
/// | Q3_K | 32 high-bit bytes, 64 crumb bytes, 12 bytes of 6-bit scales, f16 `d` | `d · (sc − 32) · (q − 4)`; `q`'s low 2 bits at bits `2j` of byte `32 + 32n + 16s + l`, bit 2 at bit `4n + j` of byte `16s + l` |
/// | Q2_K | 16 bytes of 4-bit scale and min, 64 crumb bytes, f16 `d`, f16 `dmin` | `d · sc · q − dmin · m`; `q` at bits `2j` of byte `16 + 32n + 16s + l` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sixteens {
    Q2K,
    Q3K,
    Q6K,
}

/// Codes, the scales' ints and factor, and the biases' (Q2_K) of one super-block.
struct Super16 {
    codes: [u8; SUPER],
    scales: [i8; 16],
    d: f16,
    /// `m` and `−dmin`.
    biases: Option<([i8; 16], f16)>,
}

impl Sixteens {
    fn of(dtype: GgmlDType) -> Option<Sixteens> {
        match dtype {
            GgmlDType::Q2K => Some(Sixteens::Q2K),
            GgmlDType::Q3K => Some(Sixteens::Q3K),
            GgmlDType::Q6K => Some(Sixteens::Q6K),
            _ => None,
        }
    }

    fn dtype(self) -> GgmlDType {
        match self {
            Sixteens::Q2K => GgmlDType::Q2K,
            Sixteens::Q3K => GgmlDType::Q3K,
            Sixteens::Q6K => GgmlDType::Q6K,
        }
    }

    /// Bits and zero point of the codes.
    fn bits_and_zero(self) -> (u32, i32) {
        match self {
            Sixteens::Q2K => (2, 0),
            Sixteens::Q3K => (3, 4),
            Sixteens::Q6K => (6, 32),
        }
    }

    /// Where value `v`'s bits live: (half `n`, `j`, `16s + l`).
    fn place(v: usize) -> (usize, usize, usize) {
        (v / 128, v % 128 / 32, v % 32)
    }

    fn decode(self, b: &[u8]) -> Super16 {
        let mut codes = [0u8; SUPER];
        for (v, c) in codes.iter_mut().enumerate() {
            let (n, j, l) = Sixteens::place(v);
            *c = match self {
                Sixteens::Q6K => {
                    let nibble = b[64 * n + 32 * (j % 2) + l] >> (4 * (j / 2)) & 0xF;
                    nibble | (b[128 + 32 * n + l] >> (2 * j) & 3) << 4
                }
                Sixteens::Q3K => {
                    (b[32 + 32 * n + l] >> (2 * j) & 3) | (b[l] >> (4 * n + j) & 1) << 2
                }
                Sixteens::Q2K => b[16 + 32 * n + l] >> (2 * j) & 3,
            };
        }
        let mut scales = [0i8; 16];
        let mut biases = None;
        let d = match self {
            Sixteens::Q6K => {
                for (s, &raw) in scales.iter_mut().zip(&b[192..208]) {
                    *s = raw as i8;
                }
                half_at(b, 208)
            }
            Sixteens::Q3K => {
                // 6-bit scales: the low 4 bits of scale `i` in the nibbles of bytes 96–103,
                // its top 2 in bytes 104–107 (llama.cpp's `kmask` shuffle).
                let raw = &b[96..108];
                for (i, s) in scales.iter_mut().enumerate() {
                    let (w, byte) = (i / 4, i % 4);
                    let low = raw[4 * (w % 2) + byte] >> (4 * (w / 2)) & 0xF;
                    let top = raw[8 + byte] >> (2 * w) & 3;
                    *s = (low | top << 4) as i8 - 32;
                }
                half_at(b, 108)
            }
            Sixteens::Q2K => {
                let mut m = [0i8; 16];
                for ((s, m), &raw) in scales.iter_mut().zip(&mut m).zip(&b[..16]) {
                    (*s, *m) = ((raw & 0xF) as i8, (raw >> 4) as i8);
                }
                biases = Some((m, -half_at(b, 82)));
                half_at(b, 80)
            }
        };
        Super16 {
            codes,
            scales,
            d,
            biases,
        }
    }

    /// The inverse of [`Sixteens::decode`].
    fn encode(self, s: &Super16, out: &mut Vec<u8>) {
        let mut b = vec![0u8; self.dtype().type_size()];
        for (v, &q) in s.codes.iter().enumerate() {
            let (n, j, l) = Sixteens::place(v);
            match self {
                Sixteens::Q6K => {
                    b[64 * n + 32 * (j % 2) + l] |= (q & 0xF) << (4 * (j / 2));
                    b[128 + 32 * n + l] |= (q >> 4) << (2 * j);
                }
                Sixteens::Q3K => {
                    b[32 + 32 * n + l] |= (q & 3) << (2 * j);
                    b[l] |= (q >> 2) << (4 * n + j);
                }
                Sixteens::Q2K => b[16 + 32 * n + l] |= q << (2 * j),
            }
        }
        let d = s.d.to_le_bytes();
        match self {
            Sixteens::Q6K => {
                for (raw, &sc) in b[192..208].iter_mut().zip(&s.scales) {
                    *raw = sc as u8;
                }
                b[208..].copy_from_slice(&d);
            }
            Sixteens::Q3K => {
                for (i, &sc) in s.scales.iter().enumerate() {
                    let (w, byte, u) = (i / 4, i % 4, (sc + 32) as u8);
                    b[96 + 4 * (w % 2) + byte] |= (u & 0xF) << (4 * (w / 2));
                    b[104 + byte] |= (u >> 4) << (2 * w);
                }
                b[108..].copy_from_slice(&d);
            }
            Sixteens::Q2K => {
                let (m, neg_dmin) = s.biases.expect("Q2_K has biases");
                for ((raw, &sc), &m) in b[..16].iter_mut().zip(&s.scales).zip(&m) {
                    *raw = sc as u8 | (m as u8) << 4;
                }
                b[80..82].copy_from_slice(&d);
                b[82..].copy_from_slice(&(-neg_dmin).to_le_bytes());
            }
        }
        out.extend_from_slice(&b);
    }
}

/// A Q4_K / Q5_K super-block as [`Super16`]: 8 groups of 32, in the first halves of the
/// arrays.
fn decode_k32(dtype: GgmlDType, b: &[u8]) -> Super16 {
    let mut codes = [0u8; SUPER];
    let (d, dmin, sc, m) = decode_super(dtype, b, &mut codes);
    let (mut scales, mut mins) = ([0i8; 16], [0i8; 16]);
    for g in 0..8 {
        // 6-bit scales and mins fit an int8.
        (scales[g], mins[g]) = (sc[g] as i8, m[g] as i8);
    }
    Super16 {
        codes,
        scales,
        d,
        biases: Some((mins, -dmin)),
    }
}

/// K-quant blocks `[rows, cols]` as [`SuperBlocks`] for our kernels (Q4_K, Q5_K in groups
/// of 32; Q2_K, Q3_K, Q6_K in groups of 16), or `None` for other types. Their products
/// (`d · sc`, `dmin · m`: an f16 times a small integer) are exact in f32, as GGML computes
/// them.
pub fn to_super_blocks(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<SuperBlocks>> {
    let sixteens = Sixteens::of(dtype);
    let (bits, zero) = match (dtype, sixteens) {
        (_, Some(k)) => k.bits_and_zero(),
        (GgmlDType::Q4K, _) => (4, 0),
        (GgmlDType::Q5K, _) => (5, 0),
        _ => return Ok(None),
    };
    let block_bytes = dtype.type_size();
    if cols == 0 || !cols.is_multiple_of(SUPER) || data.len() != rows * cols / SUPER * block_bytes {
        return Err(Error::param(
            "weights",
            format!(
                "{} bytes of {dtype:?} blocks do not fit [{rows}, {cols}]",
                data.len()
            ),
        ));
    }
    let group_size = if sixteens.is_some() { 16 } else { BLOCK };
    let per = SUPER / group_size;
    let decoded: Vec<Super16> = data
        .par_chunks(block_bytes)
        .map(|b| sixteens.map_or_else(|| decode_k32(dtype, b), |k| k.decode(b)))
        .collect();
    let supers = decoded.len();
    let mut out = SuperBlocks {
        rows,
        cols,
        bits,
        group_size,
        zero,
        codes: Vec::with_capacity(rows * cols),
        scales: Levels {
            ints: Vec::with_capacity(supers * per),
            factors: Vec::with_capacity(supers),
        },
        biases: (sixteens != Some(Sixteens::Q3K) && sixteens != Some(Sixteens::Q6K)).then(|| {
            Levels {
                ints: Vec::with_capacity(supers * per),
                factors: Vec::with_capacity(supers),
            }
        }),
    };
    for s in &decoded {
        out.codes.extend_from_slice(&s.codes);
        out.scales.ints.extend_from_slice(&s.scales[..per]);
        out.scales.factors.push(s.d);
        if let (Some(levels), Some((m, f))) = (out.biases.as_mut(), s.biases) {
            levels.ints.extend_from_slice(&m[..per]);
            levels.factors.push(f);
        }
    }
    Ok(Some(out))
}

/// The inverse of [`to_super_blocks`] for groups of 16: a matrix packed from Q2_K, Q3_K
/// or Q6_K blocks as those blocks again (for candle's GPU kernels), `None` for the other
/// forms.
pub fn to_ggml(p: &PackedMatrix) -> Option<(GgmlDType, Vec<u8>)> {
    let kind = match (p.bits, p.group_size) {
        (2, 16) => Sixteens::Q2K,
        (3, 16) => Sixteens::Q3K,
        (6, 16) => Sixteens::Q6K,
        _ => return None,
    };
    let mut out = Vec::with_capacity(p.rows * p.cols / SUPER * kind.dtype().type_size());
    for r in 0..p.rows {
        let row = p.super_row(r)?;
        for s in 0..p.cols / SUPER {
            let ints = |l: &Levels| -> [i8; 16] {
                l.ints[16 * s..16 * (s + 1)].try_into().expect("16 groups")
            };
            let block = Super16 {
                codes: row.codes[SUPER * s..SUPER * (s + 1)]
                    .try_into()
                    .expect("256 codes"),
                scales: ints(&row.scales),
                d: row.scales.factors[s],
                biases: row.biases.as_ref().map(|b| (ints(b), b.factors[s])),
            };
            kind.encode(&block, &mut out);
        }
    }
    Some((kind.dtype(), out))
}

/// GGML blocks `[rows, cols]` in our kernels' layout: the k-quants in their two levels of
/// scales, the other affine types (above) as affine groups; `None` for the others.
pub fn to_packed(
    dtype: GgmlDType,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Option<PackedMatrix>> {
    if let Some(b) = to_super_blocks(dtype, data, rows, cols)? {
        return Ok(Some(PackedMatrix::from_super_blocks(&b)));
    }
    Ok(to_affine(dtype, data, rows, cols)?.map(|a| PackedMatrix::from_affine(&a)))
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

/// The levels of ggml's non-linear 4-bit types (ggml-common.h `kvalues_iq4nl`): a code
/// `q` stands for `IQ4_LEVELS[q]` times its group's scale.
const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// ggml's non-linear 4-bit types, which candle 0.11 does not know: each 4-bit code picks
/// one of 16 fixed levels ([`IQ4_LEVELS`]) rather than a step of a linear scale.
///
/// | type | block (bytes) | value |
/// |------|---------------|-------|
/// | IQ4_NL | f16 d, 16 × two nibbles (32 values) | `d · level` |
/// | IQ4_XS | 256 values: f16 d, u16 top crumbs, 4 bytes of low nibbles of 8 6-bit `ls`, 128 × two nibbles | `d · (ls − 32) · level`, `ls` per 32 values |
///
/// Both are read exactly into 8-bit forms candle's kernels and the converter take: IQ4_NL
/// as Q8_0 (the level is an int8, the scale the same f16); IQ4_XS as affine groups of 32
/// whose f32 scale is `d · (ls − 32)` (an f16 times a 6-bit integer: exact, as ggml
/// computes it). Our kernels keep those 8-bit codes as 4-bit indices into the levels
/// ([`iq4_to_packed`], looked up with `vpshufb` as a block is unpacked): the file's size
/// in memory rather than 1.9× (IQ4_NL) or 2.4× (IQ4_XS) it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iq4 {
    Nl,
    Xs,
}

impl Iq4 {
    /// The type of ggml's type id `id` (ggml.h `enum ggml_type`), if it is one of these.
    pub fn from_type_id(id: u32) -> Option<Iq4> {
        match id {
            20 => Some(Iq4::Nl),
            23 => Some(Iq4::Xs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Iq4::Nl => "IQ4_NL",
            Iq4::Xs => "IQ4_XS",
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Iq4::Nl => BLOCK,
            Iq4::Xs => SUPER,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Iq4::Nl => 2 + BLOCK / 2,
            Iq4::Xs => 2 + 2 + SUPER / 64 + SUPER / 2,
        }
    }

    /// The candle type whose blocks hold the same values exactly: Q8_0 for IQ4_NL, f32
    /// (dequantized) for IQ4_XS, whose scales are not f16.
    pub fn exact_ggml(self) -> GgmlDType {
        match self {
            Iq4::Nl => GgmlDType::Q8_0,
            Iq4::Xs => GgmlDType::F32,
        }
    }

    /// `data`, blocks of this type, as blocks of [`Iq4::exact_ggml`].
    pub fn to_exact_ggml(self, data: &[u8]) -> Vec<u8> {
        let blocks = data.chunks_exact(self.type_size());
        match self {
            Iq4::Nl => blocks
                .flat_map(|b| {
                    let mut q8 = [0u8; 2 + BLOCK];
                    q8[..2].copy_from_slice(&b[..2]);
                    for (q, &level) in q8[2..].iter_mut().zip(&iq4_levels(&b[2..18])) {
                        *q = level as u8;
                    }
                    q8
                })
                .collect(),
            Iq4::Xs => blocks
                .flat_map(|b| {
                    let (levels, scales) = iq4_xs_block(b);
                    (0..SUPER).map(move |v| scales[v / BLOCK] * f32::from(levels[v]))
                })
                .flat_map(f32::to_le_bytes)
                .collect(),
        }
    }
}

/// The 32 levels of 16 bytes of nibbles: byte `j` holds value `j` (low nibble) and value
/// `j + 16` (high nibble), as in Q4_0.
fn iq4_levels(nibbles: &[u8]) -> [i8; BLOCK] {
    let mut levels = [0i8; BLOCK];
    for (j, &byte) in nibbles.iter().enumerate() {
        levels[j] = IQ4_LEVELS[usize::from(byte & 0xF)];
        levels[j + 16] = IQ4_LEVELS[usize::from(byte >> 4)];
    }
    levels
}

/// An IQ4_XS super-block's 256 levels and its 8 groups' scales `d · (ls − 32)`
/// (llama.cpp's `dequantize_row_iq4_xs`): the low 4 bits of group `g`'s `ls` are nibble
/// `g % 2` of byte `4 + g / 2`, its top 2 bits bits `2g` of the u16 at byte 2.
fn iq4_xs_block(b: &[u8]) -> ([i8; SUPER], [f32; 8]) {
    let d = half_at(b, 0).to_f32();
    let high = u16::from_le_bytes([b[2], b[3]]);
    let mut levels = [0i8; SUPER];
    let mut scales = [0f32; 8];
    for g in 0..8 {
        let low = b[4 + g / 2] >> (4 * (g % 2)) & 0xF;
        let ls = i32::from(low) | i32::from(high >> (2 * g) & 3) << 4;
        scales[g] = d * (ls - 32) as f32;
        let nibbles = &b[8 + 16 * g..8 + 16 * (g + 1)];
        levels[BLOCK * g..BLOCK * (g + 1)].copy_from_slice(&iq4_levels(nibbles));
    }
    (levels, scales)
}

/// IQ4_XS blocks `[rows, cols]` as an affine matrix in groups of 32 at 8 bits: code
/// `level + 128`, scale `d · (ls − 32)` and bias `−128 · scale` in f32, so that `scale ·
/// code + bias` is ggml's `d · (ls − 32) · level` exactly (every product fits f32's 24
/// bits).
pub fn iq4_xs_to_affine(data: &[u8], rows: usize, cols: usize) -> Result<AffineMatrix> {
    let bytes = Iq4::Xs.type_size();
    if cols == 0 || !cols.is_multiple_of(SUPER) || data.len() != rows * cols / SUPER * bytes {
        return Err(Error::param(
            "weights",
            format!(
                "{} bytes of IQ4_XS blocks do not fit [{rows}, {cols}]",
                data.len()
            ),
        ));
    }
    AffineMatrix::from_rows(
        data,
        cols / SUPER * bytes,
        (rows, cols, 8, BLOCK, ScaleDType::F32),
        |row, codes, scales, biases| {
            for (i, b) in row.chunks_exact(bytes).enumerate() {
                let (levels, s) = iq4_xs_block(b);
                for (c, &level) in codes[SUPER * i..SUPER * (i + 1)].iter_mut().zip(&levels) {
                    *c = (i16::from(level) + 128) as u8;
                }
                for g in 0..8 {
                    scales[8 * i + g] = s[g];
                    biases[8 * i + g] = -128.0 * s[g];
                }
            }
        },
    )
}

/// IQ4 blocks `[rows, cols]` in our kernels' layout at their own size: the exact 8-bit
/// affine form (IQ4_NL as Q8_0, IQ4_XS by [`iq4_xs_to_affine`]) with its codes kept as
/// 4-bit indices into [`IQ4_LEVELS`].
pub fn iq4_to_packed(iq: Iq4, data: &[u8], rows: usize, cols: usize) -> Result<PackedMatrix> {
    let affine = match iq {
        Iq4::Nl => to_affine(GgmlDType::Q8_0, &iq.to_exact_ggml(data), rows, cols)?
            .ok_or_else(|| Error::Internal("Q8_0 is not affine".into()))?,
        Iq4::Xs => iq4_xs_to_affine(data, rows, cols)?,
    };
    PackedMatrix::from_affine_codebook(&affine, &IQ4_LEVELS)
        .ok_or_else(|| Error::Internal(format!("{} levels outside the codebook", iq.name())))
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
            let want = candle_values(&q);
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

    /// Candle's dequantization of `q`, row-major: the reference.
    fn candle_values(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Q4_K and Q5_K super-blocks of random bytes (finite d and dmin of any sign and
    /// exponent but the infinite/NaN one, every 6-bit scale and min pattern, every code):
    /// candle's dequantizer is the reference, bit for bit, and a wrong block count is an
    /// error.
    #[test]
    fn k_quant_super_blocks_are_affine_groups() {
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config::with_cases(64));
        let case = (
            prop_oneof![Just(GgmlDType::Q4K), Just(GgmlDType::Q5K)],
            1usize..3,
            1usize..3,
        )
            .prop_flat_map(|(dtype, rows, blocks)| {
                let len = rows * blocks * dtype.type_size();
                let bytes = proptest::collection::vec(any::<u8>(), len);
                (Just(dtype), Just(rows), Just(blocks), bytes)
            });
        runner
            .run(&case, |(dtype, rows, blocks, mut bytes)| {
                let cols = blocks * 256;
                // d and dmin finite: an all-ones f16 exponent loses its top bit.
                for b in bytes.chunks_mut(dtype.type_size()) {
                    for at in [0, 2] {
                        if !f16::from_le_bytes([b[at], b[at + 1]]).is_finite() {
                            b[at + 1] &= 0xBF;
                        }
                    }
                }
                let q = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
                let want = candle_values(&q);
                let a = to_affine(dtype, &bytes, rows, cols).unwrap().unwrap();
                prop_assert_eq!(a.scale_dtype, ScaleDType::F32);
                let got = a.dequantize();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    prop_assert_eq!(g.to_bits(), w.to_bits(), "{:?} value {}", dtype, i);
                }
                prop_assert!(to_affine(dtype, &bytes[1..], rows, cols).is_err());
                Ok(())
            })
            .unwrap();
    }

    /// K-quant super-blocks of random bytes (finite d and dmin of any sign, every scale,
    /// min and code) in our kernels' layout: candle's dequantizer is the reference, bit for
    /// bit; the blocks in groups of 16 (Q2_K, Q3_K, Q6_K) come back unchanged; every instruction set gives the scalar
    /// reference's products to the bit, and those are the dequantized weights' products up
    /// to the activations' rounding; row slices, tile-aligned or not, keep their values.
    #[test]
    fn k_quants_run_in_our_tiles() {
        use crate::quant::kernels::QuantizedRows;
        use crate::quant::Isa;
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config::with_cases(48));
        let case = (
            prop_oneof![
                Just(GgmlDType::Q2K),
                Just(GgmlDType::Q3K),
                Just(GgmlDType::Q4K),
                Just(GgmlDType::Q5K),
                Just(GgmlDType::Q6K)
            ],
            1usize..20,
            1usize..3,
            // One tile of activations for the AVX-512 kernels; several for AMX.
            prop_oneof![1usize..6, 15usize..40],
        )
            .prop_flat_map(|(dtype, rows, blocks, m)| {
                let bytes =
                    proptest::collection::vec(any::<u8>(), rows * blocks * dtype.type_size());
                let x = proptest::collection::vec(-1.0f32..1.0, m * blocks * SUPER);
                (Just(dtype), Just(rows), Just(blocks), Just(m), bytes, x)
            });
        runner
            .run(&case, |(dtype, rows, blocks, m, mut bytes, x)| {
                let (cols, block_bytes) = (blocks * SUPER, dtype.type_size());
                for b in bytes.chunks_mut(block_bytes) {
                    // d (and dmin) finite and small enough that no product overflows.
                    let high_bytes: &[usize] = match dtype {
                        GgmlDType::Q2K => &[81, 83],
                        GgmlDType::Q3K => &[109],
                        GgmlDType::Q6K => &[209],
                        _ => &[1, 3],
                    };
                    for &at in high_bytes {
                        b[at] &= 0xBB;
                    }
                }
                let q = qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
                let want = candle_values(&q);
                let p = to_packed(dtype, &bytes, rows, cols).unwrap().unwrap();
                let got = p.dequantize();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    prop_assert_eq!(g.to_bits(), w.to_bits(), "{:?} value {}", dtype, i);
                }
                let sixteens = p.group_size == 16;
                prop_assert_eq!(to_ggml(&p), sixteens.then(|| (dtype, bytes.clone())));
                prop_assert!(to_packed(dtype, &bytes[1..], rows, cols).is_err());

                let xq = QuantizedRows::new(&x, m, cols, p.group_size);
                let reference = p.matmul_t_on(Isa::Scalar, &xq);
                for i in 0..m {
                    for j in 0..rows {
                        let (xr, wr) = (
                            &x[i * cols..(i + 1) * cols],
                            &want[j * cols..(j + 1) * cols],
                        );
                        let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        let bound: f32 = xr
                            .chunks(32)
                            .zip(wr.chunks(32))
                            .map(|(xb, wb)| {
                                let dx = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                                0.5 * dx * wb.iter().map(|v| v.abs()).sum::<f32>()
                            })
                            .sum();
                        let got = reference[i * rows + j];
                        prop_assert!(
                            (got - exact).abs() <= bound * 1.01 + 1e-3 * (1.0 + exact.abs()),
                            "{} vs exact {} (bound {})",
                            got,
                            exact,
                            bound
                        );
                    }
                }
                for &isa in Isa::available() {
                    prop_assert_eq!(p.matmul_t_on(isa, &xq), reference.clone(), "{:?}", isa);
                }
                // Tiles in pairs (Intel's products) give each tile's bits on any CPU.
                #[cfg(target_arch = "x86_64")]
                if let Some([pairs, single]) = crate::quant::kernels::pairs_and_singles(&p, &xq) {
                    prop_assert_eq!(pairs, single, "{:?} in pairs", dtype);
                }
                if rows > 8 {
                    let tail = p.rows(8, rows - 8).unwrap();
                    prop_assert_eq!(tail.dequantize(), got[8 * cols..].to_vec());
                    if sixteens {
                        let tail_bytes = bytes[8 * blocks * block_bytes..].to_vec();
                        prop_assert_eq!(to_ggml(&tail), Some((dtype, tail_bytes)));
                    }
                }
                if rows >= 2 {
                    // Mid-tile: gathered again in the same form.
                    let one = p.rows(1, 1).unwrap();
                    prop_assert_eq!(one.dequantize(), got[cols..2 * cols].to_vec());
                    if sixteens {
                        let row_bytes =
                            bytes[blocks * block_bytes..2 * blocks * block_bytes].to_vec();
                        prop_assert_eq!(to_ggml(&one), Some((dtype, row_bytes)));
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// ggml's `dequantize_row_iq4_nl` / `dequantize_row_iq4_xs`, written out as ggml has
    /// them (the `gguf` package's dequantizer checks the same from Python).
    fn ggml_iq4_values(iq: Iq4, data: &[u8]) -> Vec<f32> {
        const KVALUES: [i8; 16] = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        let mut y = Vec::new();
        for x in data.chunks_exact(iq.type_size()) {
            let d = f16::from_le_bytes([x[0], x[1]]).to_f32();
            let groups: Vec<(f32, &[u8])> = match iq {
                Iq4::Nl => vec![(d, &x[2..18])],
                Iq4::Xs => {
                    let scales_h = u16::from_le_bytes([x[2], x[3]]);
                    (0..8)
                        .map(|ib| {
                            let ls = i32::from(x[4 + ib / 2] >> (4 * (ib % 2)) & 0xf)
                                | i32::from((scales_h >> (2 * ib) & 3) << 4);
                            (d * (ls - 32) as f32, &x[8 + 16 * ib..24 + 16 * ib])
                        })
                        .collect()
                }
            };
            for (dl, qs) in groups {
                let mut block = [0f32; 32];
                for j in 0..16 {
                    block[j] = dl * f32::from(KVALUES[usize::from(qs[j] & 0xf)]);
                    block[j + 16] = dl * f32::from(KVALUES[usize::from(qs[j] >> 4)]);
                }
                y.extend_from_slice(&block);
            }
        }
        y
    }

    /// IQ4_NL and IQ4_XS blocks of random bytes (finite d of any sign and exponent, every
    /// code and 6-bit scale): read as Q8_0 (candle's dequantizer) or f32, and in our
    /// kernels' layout (8-bit codes, or 4-bit indices into the levels), they are ggml's
    /// values exactly; every instruction set gives the scalar kernel's products to the
    /// bit in both forms; a wrong byte count is an error.
    #[test]
    fn iq4_blocks_read_exactly() {
        use crate::quant::kernels::QuantizedRows;
        use crate::quant::Isa;
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config::with_cases(48));
        let case = (
            prop_oneof![Just(Iq4::Nl), Just(Iq4::Xs)],
            1usize..20,
            1usize..3,
            prop_oneof![1usize..6, 15usize..40],
        )
            .prop_flat_map(|(iq, rows, supers, m)| {
                let len = rows * supers * SUPER / iq.block_size() * iq.type_size();
                let bytes = proptest::collection::vec(any::<u8>(), len);
                let x = proptest::collection::vec(-1.0f32..1.0, m * supers * SUPER);
                (Just(iq), Just(rows), Just(supers), Just(m), bytes, x)
            });
        runner
            .run(&case, |(iq, rows, supers, m, mut bytes, x)| {
                let cols = supers * SUPER;
                for b in bytes.chunks_mut(iq.type_size()) {
                    // d finite and small enough that no product overflows.
                    b[1] &= 0xBB;
                }
                let want = ggml_iq4_values(iq, &bytes);
                let exact = iq.to_exact_ggml(&bytes);
                let q = qtensor_from_ggml(iq.exact_ggml(), &exact, vec![rows, cols], &Device::Cpu)
                    .unwrap();
                let p = match iq {
                    Iq4::Nl => to_packed(GgmlDType::Q8_0, &exact, rows, cols)
                        .unwrap()
                        .unwrap(),
                    Iq4::Xs => {
                        prop_assert!(iq4_xs_to_affine(&bytes[1..], rows, cols).is_err());
                        let a = iq4_xs_to_affine(&bytes, rows, cols).unwrap();
                        PackedMatrix::from_affine(&a)
                    }
                };
                for (form, got) in [("exact", candle_values(&q)), ("packed", p.dequantize())] {
                    // Equal values; a zero scale's zeros may differ in sign (`d · (ls − 32)`
                    // is −0 for a negative `ls − 32`, the affine form's `s · code + bias` +0).
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        prop_assert_eq!(g, w, "{:?} {} value {}", iq, form, i);
                    }
                }
                // At 4 bits a code (indices into the levels): the same values, half the
                // codes' bytes, and the 8-bit form's products to the bit.
                prop_assert!(iq4_to_packed(iq, &bytes[1..], rows, cols).is_err());
                let book = iq4_to_packed(iq, &bytes, rows, cols).unwrap();
                prop_assert_eq!(book.dequantize(), p.dequantize());
                prop_assert_eq!(
                    book.to_affine().unwrap().dequantize(),
                    p.to_affine().unwrap().dequantize()
                );
                prop_assert!(book.nbytes() < p.nbytes());
                if rows > 1 {
                    let (part, whole) = (
                        book.rows(1, rows - 1).unwrap(),
                        p.rows(1, rows - 1).unwrap(),
                    );
                    prop_assert_eq!(part.dequantize(), whole.dequantize());
                }
                let xq = QuantizedRows::new(&x, m, cols, p.group_size);
                let reference = p.matmul_t_on(Isa::Scalar, &xq);
                for &isa in Isa::available() {
                    prop_assert_eq!(p.matmul_t_on(isa, &xq), reference.clone(), "{:?}", isa);
                    prop_assert_eq!(
                        book.matmul_t_on(isa, &xq),
                        reference.clone(),
                        "{:?} 4-bit",
                        isa
                    );
                }
                #[cfg(target_arch = "x86_64")]
                if let Some([pairs, single]) = crate::quant::kernels::pairs_and_singles(&book, &xq)
                {
                    prop_assert_eq!(pairs, single, "{:?} 4-bit in pairs", iq);
                }
                Ok(())
            })
            .unwrap();
    }
}
