//! Quantized matrix products on the CPU: `x: [m, k]` (f32) times the transpose of an affine
//! weight matrix `[n, k]` (MLX groups of 32/64/128 at 2–8 bits, which GGUF's Q4_0, Q4_1,
//! Q5_0, Q5_1 and Q8_0 are too, see `ggml`), without expanding the weights to floats.
//!
//! Activations are quantized to int8 per block of 32 values (`x ≈ dx · qx`, as llama.cpp's
//! Q8 activations), so each block of a weight row contributes an integer dot product:
//!
//! ```text
//! y[i, j] = Σ_blocks b  s[j, g(b)] · dx[i, b] · Σ_{v∈b} q[j, v] · qx[i, v]   (integer)
//!         + Σ_groups g  bias[j, g] · Σ_{v∈g} x[i, v]                        (exact sums)
//! ```
//!
//! The integer dots run on AVX2 (`maddubs`: u8 × i8 pairs → i16 → i32) or AVX-512 VNNI
//! (`dpbusd`: u8 × i8 quads → i32 in one instruction), picked at run time from the CPU's
//! features, with a portable scalar path that computes the same sums.
//!
//! Weights are repacked once, at load, into [`PackedMatrix`]: per row, blocks of 32 values
//! whose byte layout lets one 256-bit register hold a block's 32 codes after a few shifts
//! and masks (`4 · bits` bytes per block):
//!
//! | bits | block bytes |
//! |------|-------------|
//! | 2 | crumbs: byte j = c[j] ∣ c[j+8]≪2 ∣ c[j+16]≪4 ∣ c[j+24]≪6 |
//! | 3 | crumbs of c & 3, then a 32-bit plane of bit 2 (bit v = c[v]≫2) |
//! | 4 | nibbles: byte j = c[j] ∣ c[j+16]≪4 |
//! | 5 | nibbles of c & 15, then a 32-bit plane of bit 4 |
//! | 6 | nibbles of c & 15, then crumbs of c ≫ 4 |
//! | 8 | c − 128 as i8 (the bias term adds 128·scale back): `maddubs` needs one operand unsigned, and codes up to 255 times 127 would overflow its i16 pair sums |

use std::sync::OnceLock;

use rayon::prelude::*;

use super::affine::{dot, transpose, AffineMatrix, ScaleDType};
use crate::error::{Error, Result};

/// Values per block: the unit of activation quantization and of the weight layout.
pub const BLOCK: usize = 32;

/// The instruction sets the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`, with AVX-512 VL), plus AVX2 + FMA.
    Avx512Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<Isa> {
        let mut levels = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                levels.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    levels.push(Isa::Avx512Vnni);
                }
            }
        }
        levels
    }

    /// The level the model runs with: the best available, or the one `CORTEX_KERNEL`
    /// (`scalar`, `avx2`, `avx512vnni`) asks for when the CPU has it. Decided once.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().unwrap_or(&Isa::Scalar);
            std::env::var("CORTEX_KERNEL")
                .ok()
                .and_then(|want| {
                    available
                        .into_iter()
                        .find(|isa| isa.name() == want.trim().to_ascii_lowercase())
                })
                .unwrap_or(best)
        })
    }
}

/// Bytes of one block of 32 values at `bits`.
pub const fn block_bytes(bits: u32) -> usize {
    4 * bits as usize
}

/// Writes 32 codes (each `< 2^bits`) as one block of the kernel layout (module docs).
fn encode_block(bits: u32, c: &[u8], out: &mut [u8]) {
    let nibbles = |c: &[u8], out: &mut [u8]| {
        for j in 0..16 {
            out[j] = (c[j] & 15) | (c[j + 16] & 15) << 4;
        }
    };
    let crumbs = |c: &[u8], shift: u32, out: &mut [u8]| {
        for j in 0..8 {
            out[j] = (0..4).fold(0u8, |b, q| b | ((c[j + 8 * q] >> shift) & 3) << (2 * q));
        }
    };
    let plane = |c: &[u8], shift: u32, out: &mut [u8]| {
        let bits = (0..BLOCK).fold(0u32, |p, v| p | u32::from((c[v] >> shift) & 1) << v);
        out[..4].copy_from_slice(&bits.to_le_bytes());
    };
    match bits {
        2 => crumbs(c, 0, out),
        3 => {
            crumbs(c, 0, out);
            plane(c, 2, &mut out[8..]);
        }
        4 => nibbles(c, out),
        5 => {
            nibbles(c, out);
            plane(c, 4, &mut out[16..]);
        }
        6 => {
            nibbles(c, out);
            crumbs(c, 4, &mut out[16..]);
        }
        8 => {
            for (o, &q) in out.iter_mut().zip(c) {
                *o = (i16::from(q) - 128) as i8 as u8;
            }
        }
        _ => unreachable!("bits are checked by AffineMatrix"),
    }
}

/// The inverse of [`encode_block`], as the integer the kernels multiply: the code, or for
/// 8 bits the code − 128.
fn decode_block(bits: u32, b: &[u8], out: &mut [i32; BLOCK]) {
    let crumb = |b: &[u8], v: usize| i32::from(b[v % 8] >> (2 * (v / 8)) & 3);
    let nibble = |b: &[u8], v: usize| i32::from(b[v % 16] >> (4 * (v / 16)) & 15);
    let bit = |b: &[u8], v: usize| i32::from(b[v / 8] >> (v % 8) & 1);
    for (v, o) in out.iter_mut().enumerate() {
        *o = match bits {
            2 => crumb(b, v),
            3 => crumb(b, v) | bit(&b[8..], v) << 2,
            4 => nibble(b, v),
            5 => nibble(b, v) | bit(&b[16..], v) << 4,
            6 => nibble(b, v) | crumb(&b[16..], v) << 4,
            8 => i32::from(b[v] as i8),
            _ => unreachable!("bits are checked by AffineMatrix"),
        };
    }
}

/// An affine `[rows, cols]` matrix in the kernels' layout. Scales and biases are f32 (the
/// stored values, exactly).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    /// `[rows, cols / 32, block_bytes(bits)]`.
    data: Vec<u8>,
    /// `[rows, cols / group_size]` each.
    scales: Vec<f32>,
    biases: Vec<f32>,
    /// What the source stored scales and biases in (kept for writing them back).
    pub scale_dtype: ScaleDType,
}

impl PackedMatrix {
    /// Repacks an affine matrix (done once, at load).
    pub fn from_affine(a: &AffineMatrix) -> PackedMatrix {
        let (blocks, bb) = (a.cols / BLOCK, block_bytes(a.bits));
        let mut data = vec![0u8; a.rows * blocks * bb];
        data.par_chunks_mut(blocks * bb)
            .enumerate()
            .for_each(|(r, row)| {
                let codes = a.codes(r);
                for (c, out) in codes.chunks(BLOCK).zip(row.chunks_mut(bb)) {
                    encode_block(a.bits, c, out);
                }
            });
        PackedMatrix {
            rows: a.rows,
            cols: a.cols,
            bits: a.bits,
            group_size: a.group_size,
            data,
            scales: a.scales.clone(),
            biases: a.biases.clone(),
            scale_dtype: a.scale_dtype,
        }
    }

    /// Back to MLX's layout (for requantizing or writing the weights out).
    pub fn to_affine(&self) -> Result<AffineMatrix> {
        let (blocks, bb) = (self.cols / BLOCK, block_bytes(self.bits));
        let words = self.cols * self.bits as usize / 32;
        let mut packed = vec![0u32; self.rows * words];
        let mut codes = vec![0u8; self.cols];
        let mut block = [0i32; BLOCK];
        for r in 0..self.rows {
            for (b, c) in codes.chunks_mut(BLOCK).enumerate() {
                decode_block(self.bits, self.block(r * blocks + b, bb), &mut block);
                for (c, &q) in c.iter_mut().zip(&block) {
                    *c = (q + self.code_offset()) as u8;
                }
            }
            super::affine::pack_row(&codes, self.bits, &mut packed[r * words..(r + 1) * words]);
        }
        AffineMatrix::from_parts(
            self.rows,
            self.cols,
            self.bits,
            self.group_size,
            packed,
            self.scales.clone(),
            self.biases.clone(),
            self.scale_dtype,
        )
    }

    /// What the stored integers lack of the codes: 128 for 8 bits (stored signed).
    fn code_offset(&self) -> i32 {
        if self.bits == 8 {
            128
        } else {
            0
        }
    }

    fn block(&self, index: usize, bb: usize) -> &[u8] {
        &self.data[index * bb..(index + 1) * bb]
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Bytes the matrix occupies.
    pub fn nbytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.biases.len())
    }

    /// Row `r` as f32 (`scale · q + bias` per group).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (blocks, bb, groups) = (
            self.cols / BLOCK,
            block_bytes(self.bits),
            self.groups_per_row(),
        );
        let per_group = self.group_size / BLOCK;
        let mut codes = [0i32; BLOCK];
        for (b, o) in out[..self.cols].chunks_mut(BLOCK).enumerate() {
            decode_block(self.bits, self.block(r * blocks + b, bb), &mut codes);
            let g = r * groups + b / per_group;
            let (s, bias) = (self.scales[g], self.biases[g]);
            for (o, &q) in o.iter_mut().zip(&codes) {
                *o = s * (q + self.code_offset()) as f32 + bias;
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

    /// Rows `start..start + len`.
    pub fn rows(&self, start: usize, len: usize) -> Result<PackedMatrix> {
        if start + len > self.rows {
            return Err(Error::param(
                "rows",
                format!(
                    "rows {start}..{} of a {}-row matrix",
                    start + len,
                    self.rows
                ),
            ));
        }
        let (row_bytes, groups) = (
            self.cols / BLOCK * block_bytes(self.bits),
            self.groups_per_row(),
        );
        Ok(PackedMatrix {
            rows: len,
            data: self.data[start * row_bytes..(start + len) * row_bytes].to_vec(),
            scales: self.scales[start * groups..(start + len) * groups].to_vec(),
            biases: self.biases[start * groups..(start + len) * groups].to_vec(),
            ..self.without_values()
        })
    }

    /// The matrices' rows one after another (a fused projection), or `None` unless they
    /// share width, bits and group size.
    pub fn concat(parts: &[&PackedMatrix]) -> Option<PackedMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            (p.cols, p.bits, p.group_size, p.scale_dtype)
                != (first.cols, first.bits, first.group_size, first.scale_dtype)
        }) {
            return None;
        }
        Some(PackedMatrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            biases: parts
                .iter()
                .flat_map(|p| p.biases.iter().copied())
                .collect(),
            ..first.without_values()
        })
    }

    fn without_values(&self) -> PackedMatrix {
        PackedMatrix {
            data: Vec::new(),
            scales: Vec::new(),
            biases: Vec::new(),
            ..*self
        }
    }

    /// `x: [m, cols]` times the transpose of this matrix → `[m, rows]`, on the active
    /// instruction set.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_t_on(
            Isa::active(),
            &QuantizedRows::new(x, m, self.cols, self.group_size),
        )
    }

    /// The product with activations already quantized (for this matrix's width and group
    /// size), on a given instruction set (which the CPU must have: see [`Isa::available`]).
    pub fn matmul_t_on(&self, isa: Isa, x: &QuantizedRows) -> Vec<f32> {
        assert!(
            x.k == self.cols && x.group_size == self.group_size,
            "activations quantized for another matrix"
        );
        let (m, n) = (x.m, self.rows);
        // Results weight row by weight row (`[n, m]`; rows of one task stay together), so
        // each task reads its weights once for every activation row.
        let mut cols = vec![0f32; n * m];
        let rows_per_task = (n / (4 * rayon::current_num_threads())).clamp(8, 256);
        cols.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(t, out)| self.rows_into(isa, x, t * rows_per_task, out));
        if m == 1 {
            cols
        } else {
            transpose(&cols, n, m)
        }
    }

    /// Weight rows from `j0` on, for every activation row: `out` is `[rows, m]`.
    fn rows_into(&self, isa: Isa, x: &QuantizedRows, j0: usize, out: &mut [f32]) {
        match isa {
            Isa::Scalar => self.rows_scalar(x, j0, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                assert!(Isa::available().contains(&Isa::Avx2), "this CPU lacks AVX2");
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                #[allow(unsafe_code)]
                unsafe {
                    x86::rows_avx2(self, x, j0, out)
                }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                assert!(
                    Isa::available().contains(&Isa::Avx512Vnni),
                    "this CPU lacks AVX-512 VNNI"
                );
                // SAFETY: the CPU has AVX-512 F/VL/BW/VNNI, AVX2 and FMA (checked above).
                #[allow(unsafe_code)]
                unsafe {
                    x86::rows_vnni(self, x, j0, out)
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => self.rows_scalar(x, j0, out),
        }
    }

    /// The reference: the module docs' sum, block by block.
    fn rows_scalar(&self, x: &QuantizedRows, j0: usize, out: &mut [f32]) {
        let (k, blocks, bb) = (self.cols, self.cols / BLOCK, block_bytes(self.bits));
        let (groups, per_group) = (self.groups_per_row(), self.group_size / BLOCK);
        let mut codes = [0i32; BLOCK];
        for (jj, out) in out.chunks_mut(x.m).enumerate() {
            let j = j0 + jj;
            out.fill(0.0);
            for b in 0..blocks {
                decode_block(self.bits, self.block(j * blocks + b, bb), &mut codes);
                let s = self.scales[j * groups + b / per_group];
                for (i, o) in out.iter_mut().enumerate() {
                    let qx = &x.qs[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
                    let isum: i32 = codes.iter().zip(qx).map(|(&q, &v)| q * i32::from(v)).sum();
                    *o += s * x.d[i * blocks + b] * isum as f32;
                }
            }
            for (i, o) in out.iter_mut().enumerate() {
                *o += self.bias_term(x, i, j);
            }
        }
    }

    /// `Σ_g (bias[j, g] + offset · s[j, g]) · Σ_{v∈g} x[i, v]`, the offset being what the
    /// stored integers lack of the codes.
    fn bias_term(&self, x: &QuantizedRows, i: usize, j: usize) -> f32 {
        let groups = self.groups_per_row();
        let sums = &x.group_sums[i * groups..(i + 1) * groups];
        let biased = dot(&self.biases[j * groups..(j + 1) * groups], sums);
        match self.code_offset() {
            0 => biased,
            offset => {
                biased + offset as f32 * dot(&self.scales[j * groups..(j + 1) * groups], sums)
            }
        }
    }
}

/// Activations `[m, k]` quantized to int8 per block of 32 (`x ≈ d · q`, `d = max|x| / 127`),
/// with the exact sum of each group of `group_size` (for the weights' biases).
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    pub m: usize,
    pub k: usize,
    pub group_size: usize,
    /// `[m, k]`.
    qs: Vec<i8>,
    /// `[m, k / 32]`.
    d: Vec<f32>,
    /// `[m, k / group_size]`.
    group_sums: Vec<f32>,
}

impl QuantizedRows {
    pub fn new(x: &[f32], m: usize, k: usize, group_size: usize) -> QuantizedRows {
        assert!(
            x.len() == m * k && k % group_size == 0 && group_size % BLOCK == 0,
            "activations [{m}, {k}] in groups of {group_size} from {} values",
            x.len()
        );
        let mut qs = vec![0i8; m * k];
        let mut d = vec![0f32; m * k / BLOCK];
        for ((q, d), x) in qs.chunks_mut(BLOCK).zip(&mut d).zip(x.chunks(BLOCK)) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in q.iter_mut().zip(x) {
                *q = (v * inv).round() as i8;
            }
        }
        let group_sums = x.chunks(group_size).map(|g| g.iter().sum()).collect();
        QuantizedRows {
            m,
            k,
            group_size,
            qs,
            d,
            group_sums,
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The SIMD kernels. Each weight block is expanded once into a register of 32 bytes and
    //! dotted with up to four activation rows (prefill tiles); per block the i32 sums are
    //! scaled by `s · dx` into f32 accumulators, as the scalar path does.

    use std::arch::x86_64::*;

    use super::{block_bytes, PackedMatrix, QuantizedRows, BLOCK};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_avx2(
        w: &PackedMatrix,
        x: &QuantizedRows,
        j0: usize,
        out: &mut [f32],
    ) {
        by_bits::<false>(w, x, j0, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn rows_vnni(
        w: &PackedMatrix,
        x: &QuantizedRows,
        j0: usize,
        out: &mut [f32],
    ) {
        by_bits::<true>(w, x, j0, out)
    }

    #[inline(always)]
    unsafe fn by_bits<const VNNI: bool>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        j0: usize,
        out: &mut [f32],
    ) {
        match w.bits {
            2 => rows::<VNNI, 2>(w, x, j0, out),
            3 => rows::<VNNI, 3>(w, x, j0, out),
            4 => rows::<VNNI, 4>(w, x, j0, out),
            5 => rows::<VNNI, 5>(w, x, j0, out),
            6 => rows::<VNNI, 6>(w, x, j0, out),
            8 => rows::<VNNI, 8>(w, x, j0, out),
            _ => unreachable!("bits are checked by AffineMatrix"),
        }
    }

    #[inline(always)]
    unsafe fn rows<const VNNI: bool, const BITS: u32>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        j0: usize,
        out: &mut [f32],
    ) {
        let m = x.m;
        for (jj, out) in out.chunks_mut(m).enumerate() {
            let j = j0 + jj;
            let mut i = 0;
            while i + 4 <= m {
                tile::<VNNI, BITS, 4>(w, x, j, i, &mut out[i..i + 4]);
                i += 4;
            }
            match m - i {
                3 => tile::<VNNI, BITS, 3>(w, x, j, i, &mut out[i..]),
                2 => tile::<VNNI, BITS, 2>(w, x, j, i, &mut out[i..]),
                1 => tile::<VNNI, BITS, 1>(w, x, j, i, &mut out[i..]),
                _ => {}
            }
        }
    }

    /// Weight row `j` with activation rows `i0..i0 + M`.
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const BITS: u32, const M: usize>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        j: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let (k, blocks, bb) = (w.cols, w.cols / BLOCK, block_bytes(BITS));
        let (groups, per_group) = (w.groups_per_row(), w.group_size / BLOCK);
        let row = w.data.as_ptr().add(j * blocks * bb);
        let scales = w.scales.as_ptr().add(j * groups);
        let qs = x.qs.as_ptr().add(i0 * k);
        let ds = x.d.as_ptr().add(i0 * blocks);
        let mut acc = [_mm256_setzero_ps(); M];
        for g in 0..groups {
            let s = *scales.add(g);
            for b in g * per_group..(g + 1) * per_group {
                let wv = expand::<BITS>(row.add(b * bb));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(qs.add(t * k + b * BLOCK) as *const __m256i);
                    let p = if BITS == 8 {
                        // Signed × signed: |w| × (x with w's sign).
                        idot::<VNNI>(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
                    } else {
                        idot::<VNNI>(wv, xv)
                    };
                    let sd = _mm256_set1_ps(s * *ds.add(t * blocks + b));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sd, *acc);
                }
            }
        }
        for (t, (o, acc)) in out.iter_mut().zip(acc).enumerate() {
            *o = hsum(acc) + w.bias_term(x, i0 + t, j);
        }
    }

    /// u8 × i8 products summed in fours: `[i32; 8]`.
    #[inline(always)]
    unsafe fn idot<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            // Pair sums fit i16: at most 2 · 128 · 127 (8-bit magnitudes) or 2 · 63 · 127.
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// A block's 32 codes, one per byte, in order.
    #[inline(always)]
    unsafe fn expand<const BITS: u32>(p: *const u8) -> __m256i {
        match BITS {
            2 => crumbs(p),
            3 => _mm256_or_si256(crumbs(p), _mm256_slli_epi16(plane(p.add(8)), 2)),
            4 => nibbles(p),
            5 => _mm256_or_si256(nibbles(p), _mm256_slli_epi16(plane(p.add(16)), 4)),
            6 => _mm256_or_si256(nibbles(p), _mm256_slli_epi16(crumbs(p.add(16)), 4)),
            _ => _mm256_loadu_si256(p as *const __m256i),
        }
    }

    /// 16 bytes of nibbles → values 0..16 (low nibbles), then 16..32 (high nibbles).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// 8 bytes of 2-bit values → byte `v` from bits `2·(v / 8)` of byte `v % 8`. (16-bit
    /// shifts pull the next byte's bits into the top of each byte; the mask drops them.)
    #[inline(always)]
    unsafe fn crumbs(p: *const u8) -> __m256i {
        let v = _mm_loadl_epi64(p as *const __m128i);
        let a = _mm_unpacklo_epi64(v, _mm_srli_epi16(v, 2));
        let b = _mm_unpacklo_epi64(_mm_srli_epi16(v, 4), _mm_srli_epi16(v, 6));
        _mm256_and_si256(_mm256_set_m128i(b, a), _mm256_set1_epi8(3))
    }

    /// A 32-bit plane → byte `v` = bit `v` (0 or 1).
    #[inline(always)]
    unsafe fn plane(p: *const u8) -> __m256i {
        let bits = _mm256_set1_epi32((p as *const i32).read_unaligned());
        // Byte v takes source byte v / 8 (both 128-bit lanes hold all four bytes).
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            ),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        _mm256_min_epu8(_mm256_and_si256(spread, select), _mm256_set1_epi8(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::affine::{SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
    use proptest::prelude::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every bits / group pair, odd shapes: the layout round-trips, every instruction set
        /// agrees with the scalar reference, and the reference is the dequantized f32 product
        /// up to the activations' rounding (at most half a step `dx / 2` per value).
        #[test]
        fn kernels_match_reference(bits_i in 0usize..6, g_i in 0usize..3, m in 1usize..8,
                                   n in 1usize..12, groups in 1usize..4, seed in any::<u64>()) {
            let (bits, gs) = (SUPPORTED_BITS[bits_i], SUPPORTED_GROUP_SIZES[g_i]);
            let k = gs * groups;
            let w = random(n * k, seed);
            let mut x = random(m * k, seed ^ 0xABCD);
            x[0] = 0.0; // zero and large values in the same block
            x[k - 1] *= 40.0;
            let a = AffineMatrix::quantize(&w, n, k, bits, gs, ScaleDType::F32).unwrap();
            let p = PackedMatrix::from_affine(&a);
            prop_assert_eq!(p.dequantize(), a.dequantize());
            let back = p.to_affine().unwrap();
            prop_assert_eq!((&back.packed, &back.biases), (&a.packed, &a.biases));
            let wd = a.dequantize();
            let q = QuantizedRows::new(&x, m, k, gs);
            let reference = p.matmul_t_on(Isa::Scalar, &q);
            for i in 0..m {
                for j in 0..n {
                    let (xr, wr) = (&x[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k]);
                    let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    let bound: f32 = xr.chunks(BLOCK).zip(wr.chunks(BLOCK)).map(|(xb, wb)| {
                        let dx = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                        0.5 * dx * wb.iter().map(|v| v.abs()).sum::<f32>()
                    }).sum();
                    let got = reference[i * n + j];
                    prop_assert!((got - exact).abs() <= bound * 1.01 + 1e-5,
                        "bits {} gs {}: {} vs exact {} (bound {})", bits, gs, got, exact, bound);
                }
            }
            for isa in Isa::available() {
                let y = p.matmul_t_on(isa, &q);
                for (a, b) in y.iter().zip(&reference) {
                    prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{:?}: {} vs {}", isa, a, b);
                }
            }
        }
    }

    #[test]
    fn fused_rows_are_the_parts() {
        let (k, gs) = (128, 64);
        let a = PackedMatrix::from_affine(
            &AffineMatrix::quantize(&random(5 * k, 1), 5, k, 4, gs, ScaleDType::F16).unwrap(),
        );
        let b = PackedMatrix::from_affine(
            &AffineMatrix::quantize(&random(3 * k, 2), 3, k, 4, gs, ScaleDType::F16).unwrap(),
        );
        let fused = PackedMatrix::concat(&[&a, &b]).unwrap();
        let x = random(2 * k, 3);
        let (ya, yb, y) = (a.matmul_t(&x, 2), b.matmul_t(&x, 2), fused.matmul_t(&x, 2));
        for i in 0..2 {
            assert_eq!(&y[i * 8..i * 8 + 5], &ya[i * 5..(i + 1) * 5]);
            assert_eq!(&y[i * 8 + 5..(i + 1) * 8], &yb[i * 3..(i + 1) * 3]);
        }
        assert_eq!(fused.rows(5, 3).unwrap().dequantize(), b.dequantize());
        let other = PackedMatrix::from_affine(
            &AffineMatrix::quantize(&random(k, 4), 1, k, 8, gs, ScaleDType::F16).unwrap(),
        );
        assert!(PackedMatrix::concat(&[&a, &other]).is_none());
    }
}
