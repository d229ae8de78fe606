//! Quantized matrix products on the CPU: `x: [m, k]` (f32) times the transpose of an affine
//! weight matrix `[n, k]` (MLX groups of 32/64/128 at 2–8 bits, which GGUF's Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q4_K and Q5_K are too, and the groups of 16 of Q2_K, Q3_K and Q6_K;
//! the k-quants with their two levels of scales, see `ggml`), without expanding the
//! weights to floats.
//!
//! Activations are quantized to int8 per block of 32 values (`x ≈ dx · qx`, as llama.cpp's
//! Q8 activations), so each block of a weight row contributes an integer dot product:
//!
//! ```text
//! y[i, j] = Σ_blocks b  s[j, g(b)] · dx[i, b] · Σ_{v∈b} q[j, v] · qx[i, v]   (integer)
//!         + Σ_groups g  bias[j, g] · Σ_{v∈g} dx[i, b(v)] · qx[i, v]
//! ```
//!
//! which is exactly `Σ w · x̂` for the rounded activations `x̂ = dx · qx`.
//!
//! The integer dots run on AVX-512 VNNI (`dpbusd`: u8 × i8 quads summed into i32 lanes in
//! one instruction) or AVX2 (`maddubs` + `madd`), picked at run time from the CPU's
//! features, with a portable scalar path that computes the same sums.
//!
//! **Layout.** Weights are repacked once, at load, into tiles of 8 rows whose bytes are
//! interleaved in fours: one 32-byte register holds 4 consecutive codes of each of the 8
//! rows (lane `4r + t` = row `r`, value `t`). A `dpbusd` of that register with the
//! activations' 4 values broadcast to every lane adds 4 products to each row's sum at once,
//! so a block of 32 values takes 8 such steps for 8 rows, and the scale of each row is
//! applied by one vector multiply per block (llama.cpp's repacked "8x8" kernels use the same
//! idea). Register `ρ` of a block (values `4ρ..4ρ + 4`) is stored, per block and tile, as:
//!
//! | bits | block bytes (8 rows × 32 values) |
//! |------|---------------|
//! | 4, 5, 6 | nibbles: 32 bytes for registers ρ (low) and ρ + 4 (high), ρ < 4; then for 5 bits 32 bytes whose bit ρ of byte `l` is bit 4 of byte `l` of register ρ, for 6 bits 64 bytes whose bits `2ρ′, 2ρ′ + 1` of byte `32·(ρ / 4) + l` are bits 4–5 of that byte of register ρ (`ρ′ = ρ mod 4`): one load serves four or eight registers, each taking its bits with a shift and a mask |
//! | 2, 3 | 8 bytes of 2-bit values per register (byte `v` of the register from bits `2·(v / 8)` of byte `v % 8`); then for 3 bits a 32-bit plane of bit 2 per register |
//! | 8 | the register as bytes, code − 128 as i8: `maddubs` needs one operand unsigned, and codes up to 255 times 127 would overflow its i16 pair sums (the bias term adds 128·scale back); VNNI's `dpbusd` sums in i32, so it takes the unsigned code back with one `xor` and 128 times the block's Σx off the sum |
//!
//! An 8-bit matrix with a codebook (IQ4_NL, IQ4_XS: 16 codes) stores 4-bit indices in the
//! 4-bit layout instead; the kernels look each up (`vpshufb`) as they unpack a block and
//! go on as with 8 bits.
//!
//! Rows are padded to a multiple of 8 with zero codes, scales and biases (a slice of whole
//! tiles keeps its neighbours' rows there instead; no padding row is ever written out).
//!
//! **Groups of 16** (Q2_K, Q3_K, Q6_K: e.g. `w = d · sc · (q − 32)` per 16 values for
//! Q6_K): registers 0–3 of a block are its first group and 4–7 its second, so their dots
//! are kept apart and each scaled on its own (Q2_K's biases added per group); Q3_K's and
//! Q6_K's zero points (4 and 32) come off in integers (`zero · Σ qx` of the half block), so
//! no float bias cancels against the sums.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use super::affine::{AffineMatrix, ScaleDType};
use crate::error::{Error, Result};
use crate::threads::SendPtr;

/// Values per block: the unit of activation quantization and of the weight layout.
pub const BLOCK: usize = 32;
/// Weight rows per tile.
pub const TILE: usize = 8;
/// Values per register lane.
const QUAD: usize = 4;
/// Registers per block: 32 values in quads.
const REGS: usize = BLOCK / QUAD;
/// Values in half a block: the smallest group (GGUF's Q2_K, Q3_K, Q6_K), 4 registers.
const HALF: usize = BLOCK / 2;

/// The instruction sets the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2, FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors (`vpdpbusd`, with AVX-512 VL), plus the above.
    Avx512Vnni,
    /// The above, and Intel AMX int8 tiles for products of [`AMX_MIN_ROWS`] activation
    /// rows or more, where the OS grants them (see `amx::granted`).
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Amx => "amx",
        }
    }

    /// Every level this CPU can run, lowest first (detected once).
    pub fn available() -> &'static [Isa] {
        static LEVELS: OnceLock<Vec<Isa>> = OnceLock::new();
        LEVELS.get_or_init(Isa::detect)
    }

    fn detect() -> Vec<Isa> {
        let mut levels = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                levels.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    levels.push(Isa::Avx512Vnni);
                    if amx::granted() {
                        levels.push(Isa::Amx);
                    }
                }
            }
        }
        levels
    }

    /// The level the model runs with: the best available, or the one `CORTEX_KERNEL`
    /// (`scalar`, `avx2`, `avx512vnni`, `amx`) asks for when the CPU has it (decided once),
    /// without AMX while [`Isa::allow_amx`] says so.
    pub fn active() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        let chosen = *CHOSEN.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().unwrap_or(&Isa::Scalar);
            std::env::var("CORTEX_KERNEL")
                .ok()
                .and_then(|want| {
                    available
                        .iter()
                        .copied()
                        .find(|isa| isa.name() == want.trim().to_ascii_lowercase())
                })
                .unwrap_or(best)
        });
        if chosen == Isa::Amx && !AMX_ALLOWED.load(Ordering::Relaxed) {
            Isa::Avx512Vnni
        } else {
            chosen
        }
    }

    /// Whether the models of this process may use AMX where [`Isa::active`] would (the
    /// `use_amx` of `MLXConfig`; on by default); returns the previous setting.
    /// Process-wide, as the kernels are.
    pub fn allow_amx(allowed: bool) -> bool {
        AMX_ALLOWED.swap(allowed, Ordering::Relaxed)
    }
}

/// See [`Isa::allow_amx`].
static AMX_ALLOWED: AtomicBool = AtomicBool::new(true);

/// A loop nest written in plain Rust that [`on_isa`] compiles for an instruction set.
pub trait IsaKernel {
    type Out;
    /// The work; `SIMD`: compiled with AVX2 or AVX-512 enabled (fused multiply-adds and
    /// F16C are there). Implementations are `#[inline(always)]`, so that the work is
    /// compiled inside [`on_isa`]'s functions, with their instruction sets.
    fn run<const SIMD: bool>(self) -> Self::Out;
}

/// Runs `kernel` compiled for `isa` (one of [`Isa::available`]): inside a function with
/// AVX2 or AVX-512 enabled its loops vectorise at that width (8 or 16 f32 lanes).
pub fn on_isa<K: IsaKernel>(isa: Isa, kernel: K) -> K::Out {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    unsafe fn avx2<K: IsaKernel>(kernel: K) -> K::Out {
        kernel.run::<true>()
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[allow(unsafe_code)]
    unsafe fn avx512<K: IsaKernel>(kernel: K) -> K::Out {
        kernel.run::<true>()
    }
    assert!(
        Isa::available().contains(&isa),
        "this CPU cannot run the {} kernels",
        isa.name()
    );
    match isa {
        // SAFETY: the CPU has `isa`'s features (checked above).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2(kernel) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512Vnni | Isa::Amx => unsafe { avx512(kernel) },
        _ => kernel.run::<false>(),
    }
}

/// Activation rows from which a product runs on AMX ([`Isa::Amx`]); fewer run the AVX-512
/// tiles. (16-core Xeon, 2048 × 8192 at 4 and 8 bits, one tile at a time: AMX took
/// 1.4–1.5× the time at 4 rows, 0.86–1.05× at 8 on 16 threads and 0.4–0.9× on one,
/// 0.57–0.65× at 16 rows. With tiles in pairs, on the 2-core Xeon VM at 2 threads, AMX
/// took 1.04–1.22× the pairs' time at 8 rows, 0.90–1.04× at 9, 0.89–1.0× at 10, for the
/// SmolLM2 shapes and 2048 × 8192.)
pub const AMX_MIN_ROWS: usize = 9;
/// Activation rows of an AMX tile.
const AMX_CHUNK: usize = 16;
/// Weight tiles of a strip of the AMX kernel: two `B` tiles of 16 weight rows.
const AMX_STRIP_TILES: usize = 4;

/// The most matrices one joint product takes (q/k/v is three).
const MAX_JOINT: usize = 4;

/// Bytes of one block (32 values) of a tile of 8 rows.
const fn tile_block_bytes(bits: u32) -> usize {
    BLOCK * bits as usize
}

/// Bits a code of a `bits`-bit matrix takes in its tiles: 4 for indices into a codebook
/// (`book`), else `bits`.
const fn stored_bits(bits: u32, book: bool) -> u32 {
    if book {
        4
    } else {
        bits
    }
}

/// One block of a tile as registers: `regs[ρ][4r + t]` = code of row `r`, value `4ρ + t`.
type Registers<T> = [[T; BLOCK]; REGS];

/// The low 2 bits of a register's 32 bytes, as 8 bytes: byte `j` holds those of bytes `j`,
/// `j + 8`, `j + 16`, `j + 24` from its low bits up.
fn encode_crumbs(reg: &[u8; BLOCK], out: &mut [u8]) {
    for (j, o) in out[..8].iter_mut().enumerate() {
        *o = (0..4).fold(0u8, |b, q| b | (reg[j + 8 * q] & 3) << (2 * q));
    }
}

/// Bit `shift` of a register's 32 bytes, as a little-endian u32.
fn encode_plane(reg: &[u8; BLOCK], shift: u32, out: &mut [u8]) {
    let bits = (0..BLOCK).fold(0u32, |p, v| p | u32::from((reg[v] >> shift) & 1) << v);
    out[..4].copy_from_slice(&bits.to_le_bytes());
}

/// Writes one block of a tile in the layout of the module docs.
fn encode_tile_block(bits: u32, regs: &Registers<u8>, out: &mut [u8]) {
    match bits {
        4..=6 => {
            for r in 0..REGS / 2 {
                for (l, o) in out[r * BLOCK..(r + 1) * BLOCK].iter_mut().enumerate() {
                    *o = (regs[r][l] & 15) | (regs[r + REGS / 2][l] & 15) << 4;
                }
            }
            let high = &mut out[4 * BLOCK..];
            for (r, reg) in regs.iter().enumerate() {
                for (l, &q) in reg.iter().enumerate() {
                    match bits {
                        5 => high[l] |= (q >> 4 & 1) << r,
                        6 => high[BLOCK * (r / 4) + l] |= (q >> 4 & 3) << (2 * (r % 4)),
                        _ => {}
                    }
                }
            }
        }
        2 | 3 => {
            for (r, reg) in regs.iter().enumerate() {
                encode_crumbs(reg, &mut out[8 * r..]);
                if bits == 3 {
                    encode_plane(reg, 2, &mut out[64 + 4 * r..]);
                }
            }
        }
        8 => {
            for (r, reg) in regs.iter().enumerate() {
                for (o, &q) in out[r * BLOCK..(r + 1) * BLOCK].iter_mut().zip(reg) {
                    *o = (i16::from(q) - 128) as i8 as u8;
                }
            }
        }
        _ => unreachable!("bits are checked by AffineMatrix"),
    }
}

/// The inverse of [`encode_tile_block`], as the integers the kernels multiply: the codes,
/// or for 8 bits the codes − 128.
fn decode_tile_block(bits: u32, b: &[u8], regs: &mut Registers<i32>) {
    let crumb = |b: &[u8], v: usize| i32::from(b[v % 8] >> (2 * (v / 8)) & 3);
    let bit = |b: &[u8], v: usize| i32::from(b[v / 8] >> (v % 8) & 1);
    for (r, reg) in regs.iter_mut().enumerate() {
        for (l, o) in reg.iter_mut().enumerate() {
            let nibble = || i32::from(b[(r % 4) * BLOCK + l] >> (4 * (r / 4)) & 15);
            *o = match bits {
                2 => crumb(&b[8 * r..], l),
                3 => crumb(&b[8 * r..], l) | bit(&b[64 + 4 * r..], l) << 2,
                4 => nibble(),
                5 => nibble() | i32::from(b[128 + l] >> r & 1) << 4,
                6 => nibble() | i32::from(b[128 + BLOCK * (r / 4) + l] >> (2 * (r % 4)) & 3) << 4,
                8 => i32::from(b[r * BLOCK + l] as i8),
                _ => unreachable!("bits are checked by AffineMatrix"),
            };
        }
    }
}

/// Scales or biases of a matrix, `[tiles, groups, 8]`, in the form the source stored them in,
/// converted when read: f32 copies would add a quarter to the bytes a 4-bit matrix in
/// groups of 32 streams per token.
#[derive(Debug, Clone)]
enum Params {
    /// One value a group in `dtype` (f16 for GGUF's simple blocks, usually bf16 or f16
    /// for MLX).
    Flat { bytes: Vec<u8>, dtype: ScaleDType },
    /// GGUF's k-quant levels: an int8 a group times an f16 a super-block of `per` groups
    /// (per row: `[tiles, groups / per, 8]`; `per` is 8 or 16), e.g. Q6_K's `d · sc`. The
    /// product is exact in f32 (11 and 8 significant bits).
    Super {
        ints: Vec<i8>,
        factors: Vec<f16>,
        groups: usize,
        per: usize,
    },
}

impl Params {
    /// `values` (`[tiles, groups, 8]`) in `dtype` (f32 when one of them is not exact in it).
    fn flat(values: &[f32], dtype: ScaleDType) -> Params {
        let dtype = if values.iter().all(|&v| dtype.round(v) == v) {
            dtype
        } else {
            ScaleDType::F32
        };
        Params::Flat {
            bytes: dtype.encode(values),
            dtype,
        }
    }

    /// Element `i` of `[tiles, groups, 8]`.
    fn get(&self, i: usize) -> f32 {
        match self {
            Params::Flat { bytes, dtype } => {
                let b = &bytes[i * dtype.size()..];
                match dtype {
                    ScaleDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    ScaleDType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    ScaleDType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                }
            }
            Params::Super {
                ints,
                factors,
                groups,
                per,
            } => {
                f32::from(ints[i])
                    * factors[Params::factor_index(i / TILE, *groups, *per) + i % TILE].to_f32()
            }
        }
    }

    /// Where the factors of tile-and-group `tg` (`tile · groups + g`) start.
    fn factor_index(tg: usize, groups: usize, per: usize) -> usize {
        ((tg / groups) * (groups / per) + (tg % groups) / per) * TILE
    }

    /// Tiles `t0..t1` alone, of a matrix with `groups_per_row` groups a row.
    fn tiles(&self, t0: usize, t1: usize, groups_per_row: usize) -> Params {
        match self {
            Params::Flat { bytes, dtype } => {
                let per_tile = groups_per_row * TILE * dtype.size();
                Params::Flat {
                    bytes: bytes[t0 * per_tile..t1 * per_tile].to_vec(),
                    dtype: *dtype,
                }
            }
            Params::Super {
                ints,
                factors,
                groups,
                per,
            } => {
                let (n, f) = (groups * TILE, groups / per * TILE);
                Params::Super {
                    ints: ints[t0 * n..t1 * n].to_vec(),
                    factors: factors[t0 * f..t1 * f].to_vec(),
                    groups: *groups,
                    per: *per,
                }
            }
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Params::Flat { bytes, .. } => bytes.len(),
            Params::Super { ints, factors, .. } => ints.len() + 2 * factors.len(),
        }
    }
}

/// An affine `[rows, cols]` matrix in the kernels' layout (module docs).
///
/// Weight `v` of row `r`, in group `g`, is `s · code + b` with the source's scale and bias,
/// which the kernels compute as `s · (code − zero) + (b + zero · s)`, the zero point
/// subtracted in integers: 128 for 8 bits (whose codes are stored as code − 128, so that
/// their products fit `maddubs`), 32 for Q6_K and 4 for Q3_K (`d · sc · (code − zero)`: no
/// bias stored, its `b + zero · s` is 0), else 0.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// 32, 64 or 128 (MLX, GGUF's simple blocks, Q4_K, Q5_K), or 16 (Q2_K, Q3_K, Q6_K).
    pub group_size: usize,
    /// `[tiles, cols / 32, tile_block_bytes(bits)]`.
    data: Vec<u8>,
    /// `[tiles, cols / group_size, 8]` each.
    scales: Params,
    /// `None`: the weights are `s · (code − zero)` (Q3_K, Q6_K).
    biases: Option<Params>,
    zero: i32,
    /// What the source stored scales and biases in (kept for writing them back).
    pub scale_dtype: ScaleDType,
    /// IQ4_NL and IQ4_XS: `bits` is 8, but `data` holds 4-bit indices into these 16 codes
    /// (each stored as code − 128, as 8-bit codes are), looked up as the kernels unpack a
    /// block: the matrix keeps the file's size instead of doubling it.
    codebook: Option<[i8; 16]>,
}

/// `values: [rows, per_row]` as `[tiles, per_row, 8]` (rows padded with zeros).
fn interleave<T: Copy + Default>(values: &[T], rows: usize, per_row: usize) -> Vec<T> {
    let mut out = vec![T::default(); rows.div_ceil(TILE) * per_row * TILE];
    for r in 0..rows {
        for g in 0..per_row {
            out[((r / TILE) * per_row + g) * TILE + r % TILE] = values[r * per_row + g];
        }
    }
    out
}

/// Codes `[rows, cols]` (row `r` from `codes(r)`) in tiles of 8 rows, block by block.
fn tile_codes(
    rows: usize,
    cols: usize,
    bits: u32,
    codes: impl Fn(usize) -> Vec<u8> + Sync,
) -> Vec<u8> {
    let (tiles, blocks, tbb) = (rows.div_ceil(TILE), cols / BLOCK, tile_block_bytes(bits));
    let mut data = vec![0u8; tiles * blocks * tbb];
    data.par_chunks_mut(blocks * tbb)
        .enumerate()
        .for_each(|(tile, out)| {
            let rows: Vec<Vec<u8>> = (tile * TILE..((tile + 1) * TILE).min(rows))
                .map(&codes)
                .collect();
            let mut regs: Registers<u8> = [[0; BLOCK]; REGS];
            for (b, out) in out.chunks_mut(tbb).enumerate() {
                for (r, reg) in regs.iter_mut().enumerate() {
                    for (l, o) in reg.iter_mut().enumerate() {
                        let at = b * BLOCK + r * QUAD + l % QUAD;
                        // Padding rows: code 0 (their scales and biases are 0 too).
                        *o = rows.get(l / QUAD).map_or(0, |codes| codes[at]);
                    }
                }
                encode_tile_block(bits, &regs, out);
            }
        });
    data
}

/// Values in a GGUF k-quant super-block.
pub const SUPER: usize = 256;

/// Per-group parameters in two levels: `factors[r, v / 256] · ints[r, v / group]`.
pub struct Levels {
    /// `[rows, cols / group]`.
    pub ints: Vec<i8>,
    /// `[rows, cols / 256]`.
    pub factors: Vec<f16>,
}

/// A GGUF k-quant as [`PackedMatrix::from_super_blocks`] takes it: weight `v` of row `r` is
/// `scale · (codes[r, v] − zero) + bias`, scale and bias (0 when `None`) in [`Levels`].
pub struct SuperBlocks {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    /// 32 (Q4_K, Q5_K: zero 0, biases) or 16 (Q6_K and Q3_K: zero 32 and 4, no biases;
    /// Q2_K: zero 0, biases).
    pub group_size: usize,
    pub zero: i32,
    /// `[rows, cols]`.
    pub codes: Vec<u8>,
    pub scales: Levels,
    pub biases: Option<Levels>,
}

impl PackedMatrix {
    /// Repacks an affine matrix (done once, at load).
    pub fn from_affine(a: &AffineMatrix) -> PackedMatrix {
        let data = tile_codes(a.rows, a.cols, a.bits, |r| a.codes(r));
        PackedMatrix::affine_with(a, data, None)
    }

    /// Repacks an 8-bit affine matrix whose codes are all among `codebook`'s 16 (stored
    /// as code − 128), keeping 4-bit indices into it (IQ4_NL and IQ4_XS, whose levels
    /// [`crate::quant::ggml`] reads as such codes). `None` if a code is not in it.
    pub fn from_affine_codebook(a: &AffineMatrix, codebook: &[i8; 16]) -> Option<PackedMatrix> {
        assert_eq!(a.bits, 8, "a codebook holds 8-bit codes");
        // Index of each code (`None`: not in the codebook).
        let mut index = [None; 256];
        for (i, &c) in (0u8..).zip(codebook) {
            index[(c as u8 ^ 0x80) as usize] = Some(i);
        }
        let missing = std::sync::atomic::AtomicBool::new(false);
        let data = tile_codes(a.rows, a.cols, 4, |r| {
            let codes = a.codes(r);
            codes
                .iter()
                .map(|&c| {
                    index[c as usize].unwrap_or_else(|| {
                        missing.store(true, std::sync::atomic::Ordering::Relaxed);
                        0
                    })
                })
                .collect()
        });
        (!missing.into_inner()).then(|| PackedMatrix::affine_with(a, data, Some(*codebook)))
    }

    /// `a`'s scales, biases and shape around `data` (its codes in the tiles' layout).
    fn affine_with(a: &AffineMatrix, data: Vec<u8>, codebook: Option<[i8; 16]>) -> PackedMatrix {
        let groups = a.groups_per_row();
        PackedMatrix {
            rows: a.rows,
            cols: a.cols,
            bits: a.bits,
            group_size: a.group_size,
            data,
            scales: Params::flat(&interleave(&a.scales, a.rows, groups), a.scale_dtype),
            biases: Some(Params::flat(
                &interleave(&a.biases, a.rows, groups),
                a.scale_dtype,
            )),
            zero: if a.bits == 8 { 128 } else { 0 },
            scale_dtype: a.scale_dtype,
            codebook,
        }
    }

    /// Packs a k-quant, keeping its two levels of scales (and biases): 4.6 bits a weight
    /// for Q4_K instead of the 6 of f32 per group.
    pub fn from_super_blocks(b: &SuperBlocks) -> PackedMatrix {
        let (groups, supers) = (b.cols / b.group_size, b.cols / SUPER);
        let fits =
            |l: &Levels| l.ints.len() == b.rows * groups && l.factors.len() == b.rows * supers;
        assert!(
            b.cols.is_multiple_of(SUPER)
                && b.codes.len() == b.rows * b.cols
                && fits(&b.scales)
                && b.biases.as_ref().is_none_or(fits)
                && b.bits < 8
                // The kernels: a zero point or biases in groups of 16, biases in groups of 32.
                && if b.group_size == HALF {
                    b.biases.is_none() || b.zero == 0
                } else {
                    b.group_size == BLOCK && b.zero == 0 && b.biases.is_some()
                },
            "super-blocks of [{}, {}] in groups of {}",
            b.rows,
            b.cols,
            b.group_size
        );
        let levels = |l: &Levels| Params::Super {
            ints: interleave(&l.ints, b.rows, groups),
            factors: interleave(&l.factors, b.rows, supers),
            groups,
            per: SUPER / b.group_size,
        };
        PackedMatrix {
            rows: b.rows,
            cols: b.cols,
            bits: b.bits,
            group_size: b.group_size,
            data: tile_codes(b.rows, b.cols, b.bits, |r| {
                b.codes[r * b.cols..(r + 1) * b.cols].to_vec()
            }),
            scales: levels(&b.scales),
            biases: b.biases.as_ref().map(levels),
            zero: b.zero,
            scale_dtype: ScaleDType::F32,
            codebook: None,
        }
    }

    /// Row `r` of a matrix from [`PackedMatrix::from_super_blocks`] as it took it (`None`
    /// for the other forms).
    pub fn super_row(&self, r: usize) -> Option<SuperBlocks> {
        let row_levels = |p: &Params| match p {
            Params::Super {
                ints,
                factors,
                groups,
                per,
            } => Some(Levels {
                ints: (0..*groups).map(|g| ints[self.param_index(r, g)]).collect(),
                // Super-block `f` starts at group `f · per`.
                factors: (0..groups / per)
                    .map(|f| {
                        let tg = (r / TILE) * groups + f * per;
                        factors[Params::factor_index(tg, *groups, *per) + r % TILE]
                    })
                    .collect(),
            }),
            Params::Flat { .. } => None,
        };
        let scales = row_levels(&self.scales)?;
        let mut codes = vec![0u8; self.cols];
        self.row_codes(r, |v, q| codes[v] = q as u8);
        Some(SuperBlocks {
            rows: 1,
            cols: self.cols,
            bits: self.bits,
            group_size: self.group_size,
            zero: self.zero,
            codes,
            scales,
            biases: self.biases.as_ref().and_then(row_levels),
        })
    }

    /// Rows `start..start + len` back in MLX's layout (for requantizing, slicing or
    /// writing the weights out).
    pub fn to_affine_rows(&self, start: usize, len: usize) -> Result<AffineMatrix> {
        self.check_rows(start, len)?;
        let (groups, words) = (self.groups_per_row(), self.cols * self.bits as usize / 32);
        let mut packed = vec![0u32; len * words];
        let (mut scales, mut biases) = (Vec::with_capacity(len * groups), Vec::new());
        let mut codes = vec![0u8; self.cols];
        for (r, packed) in (start..start + len).zip(packed.chunks_mut(words)) {
            self.row_codes(r, |v, q| codes[v] = (q + self.code_offset()) as u8);
            super::affine::pack_row(&codes, self.bits, packed);
            for g in 0..groups {
                let (s, b) = self.scale_and_bias(r, g);
                scales.push(s);
                biases.push(b);
            }
        }
        AffineMatrix::from_parts(
            len,
            self.cols,
            self.bits,
            self.group_size,
            packed,
            scales,
            biases,
            self.scale_dtype,
        )
    }

    fn check_rows(&self, start: usize, len: usize) -> Result<()> {
        if len == 0 || start + len > self.rows {
            return Err(Error::param(
                "rows",
                format!(
                    "rows {start}..{} of a {}-row matrix",
                    start + len,
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// The whole matrix in MLX's layout.
    pub fn to_affine(&self) -> Result<AffineMatrix> {
        self.to_affine_rows(0, self.rows)
    }

    /// Calls `f(v, q)` for every value `v` of row `r`, `q` being the stored integer.
    fn row_codes(&self, r: usize, mut f: impl FnMut(usize, i32)) {
        let (blocks, tbb) = (self.cols / BLOCK, tile_block_bytes(self.stored_bits()));
        let tile = &self.data[(r / TILE) * blocks * tbb..(r / TILE + 1) * blocks * tbb];
        let mut regs: Registers<i32> = [[0; BLOCK]; REGS];
        for (b, block) in tile.chunks(tbb).enumerate() {
            self.decode_block(block, &mut regs);
            for (reg_i, reg) in regs.iter().enumerate() {
                for t in 0..QUAD {
                    f(b * BLOCK + reg_i * QUAD + t, reg[(r % TILE) * QUAD + t]);
                }
            }
        }
    }

    /// Bits a code takes in `data` ([`stored_bits`]).
    fn stored_bits(&self) -> u32 {
        stored_bits(self.bits, self.codebook.is_some())
    }

    /// One block of a tile as the integers the kernels multiply ([`decode_tile_block`]),
    /// codebook indices looked up.
    fn decode_block(&self, block: &[u8], regs: &mut Registers<i32>) {
        decode_tile_block(self.stored_bits(), block, regs);
        if let Some(book) = &self.codebook {
            for q in regs.iter_mut().flatten() {
                *q = i32::from(book[*q as usize]);
            }
        }
    }

    /// Index of row `r`, group `g` in `scales` / `biases`.
    fn param_index(&self, r: usize, g: usize) -> usize {
        ((r / TILE) * self.groups_per_row() + g) * TILE + r % TILE
    }

    /// Row `r`, group `g`: the affine scale and bias (`w = s · code + b`).
    fn scale_and_bias(&self, r: usize, g: usize) -> (f32, f32) {
        let at = self.param_index(r, g);
        let s = self.scales.get(at);
        match &self.biases {
            Some(b) => (s, b.get(at)),
            None => (s, -(self.zero as f32) * s),
        }
    }

    /// What the stored integers lack of the codes: 128 for 8 bits (stored signed).
    fn code_offset(&self) -> i32 {
        if self.bits == 8 {
            128
        } else {
            0
        }
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group_size
    }

    /// Bytes the matrix occupies.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.scales.nbytes() + self.biases.as_ref().map_or(0, Params::nbytes)
    }

    /// Row `r` as f32 (`scale · code + bias` per group, as `mx.dequantize`; `scale ·
    /// (code − zero)` for Q3_K and Q6_K, as GGML).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let offset = self.code_offset();
        self.row_codes(r, |v, q| {
            let at = self.param_index(r, v / self.group_size);
            let s = self.scales.get(at);
            out[v] = match &self.biases {
                Some(b) => s * (q + offset) as f32 + b.get(at),
                None => s * (q + offset - self.zero) as f32,
            };
        });
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }

    /// Rows `start..start + len`: whole tiles copied when `start` begins one (the rows of
    /// the last past `len` stay as padding, never written out), else repacked in the same
    /// form.
    pub fn rows(&self, start: usize, len: usize) -> Result<PackedMatrix> {
        self.check_rows(start, len)?;
        if !start.is_multiple_of(TILE) {
            // Mid-tile: the rows' codes and levels gathered again (k-quants), or through
            // MLX's layout.
            let Some(first) = self.super_row(start) else {
                let a = self.to_affine_rows(start, len)?;
                return Ok(match &self.codebook {
                    Some(book) => PackedMatrix::from_affine_codebook(&a, book)
                        .expect("the codes came from the codebook"),
                    None => PackedMatrix::from_affine(&a),
                });
            };
            let mut all = SuperBlocks { rows: len, ..first };
            for r in start + 1..start + len {
                let row = self.super_row(r).expect("the same form as the first row");
                all.codes.extend(row.codes);
                all.scales.ints.extend(row.scales.ints);
                all.scales.factors.extend(row.scales.factors);
                if let (Some(all), Some(row)) = (all.biases.as_mut(), row.biases) {
                    all.ints.extend(row.ints);
                    all.factors.extend(row.factors);
                }
            }
            return Ok(PackedMatrix::from_super_blocks(&all));
        }
        let (t0, t1, groups) = (
            start / TILE,
            (start + len).div_ceil(TILE),
            self.groups_per_row(),
        );
        let tile_bytes = self.cols / BLOCK * tile_block_bytes(self.stored_bits());
        Ok(PackedMatrix {
            rows: len,
            data: self.data[t0 * tile_bytes..t1 * tile_bytes].to_vec(),
            scales: self.scales.tiles(t0, t1, groups),
            biases: self.biases.as_ref().map(|b| b.tiles(t0, t1, groups)),
            ..*self
        })
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
        let [out] = PackedMatrix::matmul_t_all(&[self], isa, x)
            .try_into()
            .unwrap_or_else(|_| unreachable!("one matrix, one product"));
        out
    }

    /// Several matrices of the activations' width and group size times the same
    /// activations (`[m, rows_i]` each), in one parallel operation: what a fused q/k/v or
    /// gate/up projection gains (one wake-up of the threads, the activations read by all),
    /// without concatenating the weights.
    pub fn matmul_t_all(mats: &[&PackedMatrix], isa: Isa, x: &QuantizedRows) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; x.m * w.rows]).collect();
        let mut sinks: Vec<&mut [f32]> = outs.iter_mut().map(std::vec::Vec::as_mut_slice).collect();
        PackedMatrix::matmul_t_all_slices(mats, isa, x, &mut sinks);
        outs
    }

    /// [`PackedMatrix::matmul_t_all`] into `outs[i]: [m, rows_i]` (no allocation).
    pub fn matmul_t_all_into<const N: usize>(
        mats: [&PackedMatrix; N],
        isa: Isa,
        x: &QuantizedRows,
        mut outs: [&mut [f32]; N],
    ) {
        PackedMatrix::matmul_t_all_slices(&mats, isa, x, &mut outs);
    }

    fn matmul_t_all_slices(
        mats: &[&PackedMatrix],
        isa: Isa,
        x: &QuantizedRows,
        outs: &mut [&mut [f32]],
    ) {
        assert!(
            mats.iter()
                .all(|w| x.k == w.cols && x.group_size == w.group_size),
            "activations quantized for another matrix"
        );
        assert!(
            Isa::available().contains(&isa),
            "this CPU cannot run the {} kernels",
            isa.name()
        );
        assert!(
            mats.len() == outs.len()
                && mats
                    .iter()
                    .zip(outs.iter())
                    .all(|(w, o)| o.len() == x.m * w.rows),
            "one output of [m, rows] per matrix"
        );
        assert!(
            mats.len() <= MAX_JOINT,
            "at most {MAX_JOINT} matrices at once"
        );
        let all_tiles: usize = mats.iter().map(|w| w.rows.div_ceil(TILE)).sum();
        let amx = cfg!(target_arch = "x86_64") && isa == Isa::Amx && !x.tiled.is_empty();
        // Four tasks a thread, of at most 32 tiles; on AMX however large (a task's first
        // strip starts cold, its codes not asked for ahead and the tiles configured again:
        // ~20 % of a 16-row product with the 576 × 49,152 head in tasks of 32 tiles, 2
        // threads 1.94–2.08 → 1.56–1.62 ms), in strips of four tiles.
        let per_task = all_tiles / (4 * crate::threads::num_threads());
        let per_task = if amx {
            per_task.max(1).next_multiple_of(AMX_STRIP_TILES)
        } else {
            per_task.clamp(1, 32)
        };
        // Tiles in pairs (`x86::tile_pair_vnni`) where 512-bit registers run at full speed,
        // for 3 rows or more: 1 or 2 rows are bound by how fast the codes stream in, and
        // there the pairs' two streams measured up to 8 % slower than one tile's (2 rows,
        // 2048 × 8192, one thread), though less code ran.
        #[cfg(target_arch = "x86_64")]
        let wide = matches!(isa, Isa::Avx512Vnni | Isa::Amx) && x.m >= 3 && x86::wide_registers();
        #[cfg(not(target_arch = "x86_64"))]
        let wide = false;
        // Tasks never span two matrices: matrix `i` has `tasks_of(i)` of them.
        let tasks_of = |i: usize| mats[i].rows.div_ceil(TILE).div_ceil(per_task);
        let tasks: usize = (0..mats.len()).map(tasks_of).sum();
        let mut sinks: [SendPtr<f32>; MAX_JOINT] =
            std::array::from_fn(|_| SendPtr(std::ptr::null_mut()));
        for (sink, out) in sinks.iter_mut().zip(outs.iter_mut()) {
            *sink = SendPtr(out.as_mut_ptr());
        }
        crate::threads::parallel_for(tasks, &|mut task| {
            let mut i = 0;
            while task >= tasks_of(i) {
                task -= tasks_of(i);
                i += 1;
            }
            let tiles = mats[i].rows.div_ceil(TILE);
            let (first, end) = (task * per_task, ((task + 1) * per_task).min(tiles));
            #[cfg(target_arch = "x86_64")]
            if amx {
                // SAFETY: as below, for strips of four tiles; the ISA says AMX is granted.
                #[allow(unsafe_code)]
                unsafe {
                    let strips = first / AMX_STRIP_TILES..end.div_ceil(AMX_STRIP_TILES);
                    amx::strips(mats[i], x, strips, sinks[i].get());
                }
                return;
            }
            // Pairs for groups of 32 or more (groups of 16 measured no faster in pairs:
            // a 1B Q4_K_M, whose Q6_K matrices are 30 % of its bytes, at 4 requests).
            let pairs = wide && mats[i].group_size != HALF;
            let mut tile = first;
            while tile < end {
                // SAFETY: tasks own disjoint tiles, so they write disjoint columns of the
                // outputs (`tile_into` writes only columns `8·tile..8·tile + 8` below
                // `rows`, a pair those of both tiles); the ISA was checked above.
                #[allow(unsafe_code)]
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    if pairs && tile + 1 < end {
                        x86::tile_pair_vnni(mats[i], x, tile, sinks[i].get());
                        tile += 2;
                        continue;
                    }
                    mats[i].tile_into(isa, x, tile, sinks[i].get());
                }
                tile += 1;
            }
        });
    }

    /// Columns `8·tile..` of `out: [m, rows]` (raw: other tasks fill other columns).
    #[allow(unsafe_code)]
    unsafe fn tile_into(&self, isa: Isa, x: &QuantizedRows, tile: usize, out: *mut f32) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::tile_avx2(self, x, tile, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => x86::tile_vnni(self, x, tile, out),
            _ => self.tile_scalar(x, tile, out),
        }
    }

    /// The reference: the module docs' sum for the 8 rows of a tile, in the SIMD kernels'
    /// order (per group its bias term, then per block, or per group of 16, the integer
    /// dot, each added with one fused multiply-add), so that they agree to the bit.
    #[allow(unsafe_code)]
    unsafe fn tile_scalar(&self, x: &QuantizedRows, tile: usize, out: *mut f32) {
        let (k, blocks, tbb) = (
            self.cols,
            self.cols / BLOCK,
            tile_block_bytes(self.stored_bits()),
        );
        let groups = self.groups_per_row();
        // Values per integer dot: a block, or a group of 16.
        let part = self.group_size.min(BLOCK);
        let shift = self.code_offset() - self.zero;
        let mut regs: Registers<i32> = [[0; BLOCK]; REGS];
        let mut acc = vec![[0f32; TILE]; x.m];
        for blk in 0..blocks {
            let start = (tile * blocks + blk) * tbb;
            self.decode_block(&self.data[start..start + tbb], &mut regs);
            for first in (0..BLOCK).step_by(part) {
                let g = (blk * BLOCK + first) / self.group_size;
                let at = (tile * groups + g) * TILE;
                let s: [f32; TILE] = std::array::from_fn(|r| self.scales.get(at + r));
                for (i, acc) in acc.iter_mut().enumerate() {
                    if let Some(biases) = self
                        .biases
                        .as_ref()
                        .filter(|_| (blk * BLOCK + first).is_multiple_of(self.group_size))
                    {
                        let sum = x.group_sums[i * groups + g];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let mut b = biases.get(at + r);
                            if self.zero != 0 {
                                b = (self.zero as f32).mul_add(s[r], b);
                            }
                            *acc = b.mul_add(sum, *acc);
                        }
                    }
                    let qx = &x.qs[i * k + blk * BLOCK..i * k + (blk + 1) * BLOCK];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let isum: i32 = (first..first + part)
                            .map(|v| {
                                (regs[v / QUAD][r * QUAD + v % QUAD] + shift) * i32::from(qx[v])
                            })
                            .sum();
                        *acc = (isum as f32).mul_add(s[r] * x.d[i * blocks + blk], *acc);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, &y) in acc
                .iter()
                .enumerate()
                .take(TILE.min(self.rows - tile * TILE))
            {
                *out.add(i * self.rows + tile * TILE + r) = y;
            }
        }
    }
}

/// Activations `[m, k]` quantized to int8 per block of 32 (`x ≈ d · q`, `d = max|x| / 127`),
/// with the sum of `d · q` over each group of `group_size` (for the weights' biases) and
/// `Σ q` over each half block (for their zero points).
#[derive(Debug, Clone, Default)]
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
    /// `[m, k / 16]`: `Σ q` of each half block.
    half_sums: Vec<i32>,
    /// `qs` again as AMX's activation tiles, `[m / 16 (rounded up), k / part, 16, part]`
    /// (`part`: 16 for groups of 16, else 32): each tile's rows contiguous, where `qs`'s are
    /// `k` bytes apart (which for `k` a multiple of 2 KiB puts all 16 in two sets of the
    /// L1 cache). Only while AMX is the active level, for `AMX_MIN_ROWS` rows or more; else
    /// empty (and the products run the AVX-512 tiles).
    tiled: Vec<i8>,
}

impl QuantizedRows {
    pub fn new(x: &[f32], m: usize, k: usize, group_size: usize) -> QuantizedRows {
        let mut rows = QuantizedRows::default();
        rows.quantize(x, m, k, group_size);
        rows
    }

    /// Quantizes `x: [m, k]` into these buffers (reused: no allocation once they have the
    /// capacity). Rows are independent: a batch's rows are split over the compute threads,
    /// and each row runs a loop compiled for the CPU's vector width.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, group_size: usize) {
        assert!(
            x.len() == m * k
                && k.is_multiple_of(group_size)
                && k.is_multiple_of(BLOCK)
                && (group_size == HALF || group_size.is_multiple_of(BLOCK)),
            "activations [{m}, {k}] in groups of {group_size} from {} values",
            x.len()
        );
        let (blocks, groups) = (k / BLOCK, k / group_size);
        self.qs.resize(m * k, 0);
        self.d.resize(m * blocks, 0.0);
        self.half_sums.resize(2 * m * blocks, 0);
        self.group_sums.resize(m * groups, 0.0);
        let isa = Isa::active();
        // The AMX copy only where the products will read it (AMX allowed, enough rows).
        let amx = m >= AMX_MIN_ROWS && isa == Isa::Amx;
        if amx {
            self.tiled.resize(m.next_multiple_of(AMX_CHUNK) * k, 0);
        } else {
            self.tiled.clear();
        }
        let part = group_size.min(BLOCK);
        (self.m, self.k, self.group_size) = (m, k, group_size);
        let rows_per_task = crate::threads::rows_per_task(m, k);
        let tiled = SendPtr(self.tiled.as_mut_ptr());
        let (qs, d, half_sums, group_sums) = (
            SendPtr(self.qs.as_mut_ptr()),
            SendPtr(self.d.as_mut_ptr()),
            SendPtr(self.half_sums.as_mut_ptr()),
            SendPtr(self.group_sums.as_mut_ptr()),
        );
        crate::threads::parallel_for(m.div_ceil(rows_per_task), &|task| {
            for r in task * rows_per_task..((task + 1) * rows_per_task).min(m) {
                // SAFETY: tasks own disjoint rows of the four buffers, sized above.
                #[allow(unsafe_code)]
                let row = unsafe {
                    Row {
                        q: std::slice::from_raw_parts_mut(qs.get().add(r * k), k),
                        d: std::slice::from_raw_parts_mut(d.get().add(r * blocks), blocks),
                        half_sums: std::slice::from_raw_parts_mut(
                            half_sums.get().add(2 * r * blocks),
                            2 * blocks,
                        ),
                        group_sums: std::slice::from_raw_parts_mut(
                            group_sums.get().add(r * groups),
                            groups,
                        ),
                    }
                };
                let x = &x[r * k..(r + 1) * k];
                let q = row.q.as_ptr();
                on_isa(isa, QuantizeRow { x, group_size, row });
                if amx {
                    // Row `r % 16` of every tile of its chunk.
                    let chunk = tiled.get().wrapping_add((r / AMX_CHUNK) * AMX_CHUNK * k);
                    for j in 0..k / part {
                        // SAFETY: tasks own disjoint rows, each `part` bytes of every tile
                        // of `tiled` (sized above); `q` is this row's `k` values.
                        #[allow(unsafe_code)]
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                q.add(j * part),
                                chunk.add((j * AMX_CHUNK + r % AMX_CHUNK) * part),
                                part,
                            );
                        }
                    }
                }
            }
        });
    }
}

/// One row of [`QuantizedRows`]' buffers.
struct Row<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    half_sums: &'a mut [i32],
    group_sums: &'a mut [f32],
}

/// One row of activations to round ([`quantize_row`]), for [`on_isa`].
struct QuantizeRow<'x, 'r> {
    x: &'x [f32],
    group_size: usize,
    row: Row<'r>,
}

impl IsaKernel for QuantizeRow<'_, '_> {
    type Out = ();

    #[inline(always)]
    fn run<const SIMD: bool>(self) {
        quantize_row(self.x, self.group_size, self.row);
    }
}

/// `v` rounded to the nearest integer (ties to even), for `|v| < 2^22`: adding 1.5·2^23
/// puts the integer in the low mantissa bits, from where it is read as an integer.
/// Unlike `round() as i32`, whose cast saturates (a compare and two moves per element,
/// which keep a loop scalar), this vectorises.
#[inline(always)]
pub fn round_to_int(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// One row: per block of 32, `d = max|x| / 127`, `q = x · 127 / max|x|` rounded to the
/// nearest integer (ties to even) and `Σ q` of each half; per group of `group_size`
/// values, the sum of the rounded values `d · q`.
///
/// Sums of the rounded values, not of `x`: then the product is exactly `Σ w · x̂`, whose
/// rounding error is weighted by the weights themselves (centred on 0), not by their codes
/// (all ≥ 0, so the errors would add up instead of cancelling: measured 1.6x the error on
/// GGUF Q4_1 with outlier activations).
#[inline(always)]
fn quantize_row(x: &[f32], group_size: usize, row: Row<'_>) {
    let Row {
        q,
        d,
        half_sums,
        group_sums,
    } = row;
    let (xs, _) = x.as_chunks::<BLOCK>();
    let (qs, _) = q.as_chunks_mut::<BLOCK>();
    for (b, (xb, qb)) in xs.iter().zip(qs.iter_mut()).enumerate() {
        // max|x| in 8 lanes, then across them (max is exact in any order).
        let mut lanes = [0f32; 8];
        for chunk in xb.chunks_exact(8) {
            for (l, v) in lanes.iter_mut().zip(chunk) {
                *l = l.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        d[b] = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (h, (qh, xh)) in qb
            .chunks_exact_mut(HALF)
            .zip(xb.chunks_exact(HALF))
            .enumerate()
        {
            // Round to nearest (ties to even). The clamp only acts on NaN (to −127) and on
            // a block so small that `inv` overflowed. In three fixed-length loops, which
            // vectorise: as one loop (store, then add up) it compiled to scalar code that
            // took 11 % of a 64-row decode step.
            let mut ints = [0i32; HALF];
            for (i, v) in ints.iter_mut().zip(xh) {
                #[allow(clippy::manual_clamp)] // `clamp` keeps NaN
                let v = (v * inv).max(-127.0).min(127.0);
                *i = round_to_int(v);
            }
            for (q, &i) in qh.iter_mut().zip(&ints) {
                *q = i as i8;
            }
            half_sums[2 * b + h] = ints.iter().sum();
        }
    }
    if group_size == HALF {
        for (h, sum) in group_sums.iter_mut().enumerate() {
            *sum = d[h / 2] * half_sums[h] as f32;
        }
    } else {
        let per_group = group_size / BLOCK;
        for (g, sum) in group_sums.iter_mut().enumerate() {
            *sum = 0.0;
            for b in g * per_group..(g + 1) * per_group {
                *sum += d[b] * (half_sums[2 * b] + half_sums[2 * b + 1]) as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod amx;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The SIMD kernels: a tile of 8 weight rows against up to 4 activation rows at a time,
    //! each expanded weight register serving every activation row (prefill tiles).

    #[allow(clippy::wildcard_imports)] // the intrinsics, by the dozen
    use std::arch::x86_64::*;

    use super::{
        stored_bits, tile_block_bytes, PackedMatrix, Params, QuantizedRows, ScaleDType, BLOCK,
        HALF, QUAD, REGS, TILE,
    };

    /// How far ahead of the block being multiplied a streaming product asks for its
    /// codes: into L1 `PREFETCH` bytes ahead, into L2 `PREFETCH_L2` bytes ahead. The
    /// hardware prefetchers alone left a 1B decode at 60 % of the bandwidth a plain sum
    /// reaches on one thread. On a 2-core Xeon VM the first took a 335 MB matrix at one
    /// row from 9.8 to 12.6 GB/s and 1B all-Q4_1 decode from 13.0 to 16.5 tok/s at one
    /// thread (24.2 to 30.4 at two), and decode on the 16-core Xeon by 22–31 % at 1–16
    /// threads; the second adds 2–6 %.
    const PREFETCH: usize = 2048;
    const PREFETCH_L2: usize = 8192;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        by_bits::<false>(w, x, tile, out);
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_vnni(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        by_bits::<true>(w, x, tile, out);
    }

    #[inline(always)]
    unsafe fn by_bits<const VNNI: bool>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        match (w.bits, w.group_size == HALF) {
            (2, false) => rows::<VNNI, 2, false, false>(w, x, tile, out),
            (3, false) => rows::<VNNI, 3, false, false>(w, x, tile, out),
            (4, false) => rows::<VNNI, 4, false, false>(w, x, tile, out),
            (5, false) => rows::<VNNI, 5, false, false>(w, x, tile, out),
            (6, false) => rows::<VNNI, 6, false, false>(w, x, tile, out),
            (8, false) if w.codebook.is_some() => rows::<VNNI, 8, false, true>(w, x, tile, out),
            (8, false) => rows::<VNNI, 8, false, false>(w, x, tile, out),
            (2, true) => rows::<VNNI, 2, true, false>(w, x, tile, out),
            (3, true) => rows::<VNNI, 3, true, false>(w, x, tile, out),
            (6, true) => rows::<VNNI, 6, true, false>(w, x, tile, out),
            _ => unreachable!("bits are checked by AffineMatrix; groups of 16 are k-quants'"),
        }
    }

    /// `SPLIT`: groups of 16 (each half block has its own scale). `BOOK`: 8-bit codes
    /// stored as 4-bit indices into the matrix's codebook.
    #[inline(always)]
    unsafe fn rows<const VNNI: bool, const BITS: u32, const SPLIT: bool, const BOOK: bool>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        /// [`tile_rows`] on one tile.
        struct Single<'a, const VNNI: bool, const BITS: u32, const SPLIT: bool, const BOOK: bool> {
            w: &'a PackedMatrix,
            x: &'a QuantizedRows,
            tile: usize,
            out: *mut f32,
        }
        impl<const VNNI: bool, const BITS: u32, const SPLIT: bool, const BOOK: bool> Chunk
            for Single<'_, VNNI, BITS, SPLIT, BOOK>
        {
            #[inline(always)]
            unsafe fn run<const M: usize, const STREAM: bool>(&self, i0: usize) {
                tile_rows::<VNNI, BITS, SPLIT, M, BOOK, STREAM>(
                    self.w, self.x, self.tile, i0, self.out,
                );
            }
        }
        by_chunks(x.m, &Single::<VNNI, BITS, SPLIT, BOOK> { w, x, tile, out });
    }

    /// A tile kernel on the `M` activation rows from `i0` on. `STREAM`: they are the first
    /// of the product, which read the codes from memory and ask for them ahead; the rest
    /// find them in cache.
    trait Chunk {
        unsafe fn run<const M: usize, const STREAM: bool>(&self, i0: usize);
    }

    /// `kernel` over `m` activation rows: 4 at a time, then the rest.
    #[inline(always)]
    unsafe fn by_chunks(m: usize, kernel: &impl Chunk) {
        let mut i = 0;
        while i + 4 <= m {
            if i == 0 {
                kernel.run::<4, true>(i);
            } else {
                kernel.run::<4, false>(i);
            }
            i += 4;
        }
        match (m - i, i == 0) {
            (3, true) => kernel.run::<3, true>(i),
            (3, false) => kernel.run::<3, false>(i),
            (2, true) => kernel.run::<2, true>(i),
            (2, false) => kernel.run::<2, false>(i),
            (1, true) => kernel.run::<1, true>(i),
            (1, false) => kernel.run::<1, false>(i),
            _ => {}
        }
    }

    /// Activation rows `i0..` of `x` as the tiles read them (row `t` is row `i0 + t`).
    #[derive(Clone, Copy)]
    struct Rows {
        qs: *const i8,
        d: *const f32,
        group_sums: *const f32,
        half_sums: *const i32,
        k: usize,
        blocks: usize,
        groups: usize,
    }

    impl Rows {
        unsafe fn new(x: &QuantizedRows, i0: usize) -> Rows {
            let (blocks, groups) = (x.k / BLOCK, x.k / x.group_size);
            Rows {
                qs: x.qs.as_ptr().add(i0 * x.k),
                d: x.d.as_ptr().add(i0 * blocks),
                group_sums: x.group_sums.as_ptr().add(i0 * groups),
                half_sums: x.half_sums.as_ptr().add(i0 * 2 * blocks),
                k: x.k,
                blocks,
                groups,
            }
        }

        /// Row `t`'s 4 int8 values from `value` on, as one i32.
        #[inline(always)]
        unsafe fn quad(self, t: usize, value: usize) -> i32 {
            self.qs
                .add(t * self.k + value)
                .cast::<i32>()
                .read_unaligned()
        }

        /// Row `t`'s scale of block `blk`.
        #[inline(always)]
        unsafe fn d(self, t: usize, blk: usize) -> f32 {
            *self.d.add(t * self.blocks + blk)
        }

        /// Row `t`'s `Σ x` over group `g`.
        #[inline(always)]
        unsafe fn group_sum(self, t: usize, g: usize) -> f32 {
            *self.group_sums.add(t * self.groups + g)
        }

        /// Row `t`'s `Σ q` over half block `h`.
        #[inline(always)]
        unsafe fn half_sum(self, t: usize, h: usize) -> i32 {
            *self.half_sums.add(t * 2 * self.blocks + h)
        }
    }

    /// The tile's 8 weight rows with activation rows `i0..i0 + M`. `STREAM`: the codes
    /// come from memory (the first rows of a product), and are asked for ahead.
    #[inline(always)]
    unsafe fn tile_rows<
        const VNNI: bool,
        const BITS: u32,
        const SPLIT: bool,
        const M: usize,
        const BOOK: bool,
        const STREAM: bool,
    >(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        i0: usize,
        out: *mut f32,
    ) {
        let blocks = w.cols / BLOCK;
        let tbb = tile_block_bytes(stored_bits(BITS, BOOK));
        let book = codebook::<VNNI>(w);
        let groups = w.groups_per_row();
        let data = w.data.as_ptr().add(tile * blocks * tbb);
        let rows = Rows::new(x, i0);
        // The activation row's 4 values from `value` on, in every lane.
        let xq = |t: usize, value: usize| -> __m256i { _mm256_set1_epi32(rows.quad(t, value)) };
        let mut acc = [_mm256_setzero_ps(); M];
        // A decode step's product, or a small batch's, is bound by how fast the codes
        // stream in from memory. (Asked at run time, `x.m` below 4, the check cost a third
        // of the gain: 1B decode, one thread; hence a constant.)
        let stream = STREAM;
        if SPLIT {
            // Q2_K, Q3_K, Q6_K: per block two groups of 16, each with its bias term (Q2_K;
            // the others have a zero point instead, `(code − zero) · s`) and its dot.
            let zero = w.zero;
            for blk in 0..blocks {
                if stream {
                    prefetch::<BITS, BOOK>(data, blk * tbb);
                }
                let groups_of_block = [2 * blk, 2 * blk + 1];
                let s = groups_of_block.map(|g| params8(&w.scales, tile, groups, g));
                let b = w
                    .biases
                    .as_ref()
                    .map(|b| groups_of_block.map(|g| params8(b, tile, groups, g)));
                let (lo, hi) =
                    block_dots::<VNNI, BITS, true, M, BOOK>(data.add(blk * tbb), book, |t, v| {
                        xq(t, blk * BLOCK + v)
                    });
                for (t, acc) in acc.iter_mut().enumerate() {
                    let dx = _mm256_set1_ps(rows.d(t, blk));
                    for (h, isum) in [lo[t], hi[t]].into_iter().enumerate() {
                        let g = groups_of_block[h];
                        if let Some(b) = b {
                            *acc =
                                _mm256_fmadd_ps(b[h], _mm256_set1_ps(rows.group_sum(t, g)), *acc);
                        }
                        let shift = zero * rows.half_sum(t, g);
                        let isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(shift));
                        *acc = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum),
                            _mm256_mul_ps(s[h], dx),
                            *acc,
                        );
                    }
                }
            }
        } else {
            let per_group = w.group_size / BLOCK;
            let biases = w
                .biases
                .as_ref()
                .expect("affine groups of 32 or more have biases");
            // The zero point: 128 for 8 bits, else 0 (`from_super_blocks` asserts it for the
            // k-quants in groups of 32).
            let zero = w.zero;
            // The groups' loop, with `params(g)` giving group `g`'s scales and biases.
            macro_rules! groups_loop {
                ($params:expr) => {
                    for g in 0..groups {
                        let (s, mut b) = $params(g);
                        // The bias term, `(bias + zero · s) · Σx` for the group, straight
                        // into the sums (a register per row of its own measured 15–20 %
                        // slower at 64 rows).
                        if BITS == 8 {
                            b = _mm256_fmadd_ps(_mm256_set1_ps(zero as f32), s, b);
                        }
                        for (t, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(b, _mm256_set1_ps(rows.group_sum(t, g)), *acc);
                        }
                        for blk in g * per_group..(g + 1) * per_group {
                            if stream {
                                prefetch::<BITS, BOOK>(data, blk * tbb);
                            }
                            let (lo, hi) = block_dots::<VNNI, BITS, false, M, BOOK>(
                                data.add(blk * tbb),
                                book,
                                |t, v| xq(t, blk * BLOCK + v),
                            );
                            for (t, acc) in acc.iter_mut().enumerate() {
                                let mut isum = _mm256_add_epi32(lo[t], hi[t]);
                                if BITS == 8 && VNNI {
                                    // Σ code·x − 128·Σx = Σ (code − 128)·x, exactly (as
                                    // integers): the float sums stay as small as the signed
                                    // codes make them. (AVX2 multiplies the stored code −
                                    // 128 itself.)
                                    let h =
                                        rows.half_sum(t, 2 * blk) + rows.half_sum(t, 2 * blk + 1);
                                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(zero * h));
                                }
                                let sd = _mm256_mul_ps(s, _mm256_set1_ps(rows.d(t, blk)));
                                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sd, *acc);
                            }
                        }
                    }
                };
            }
            let f16_flat = |p: &Params| match p {
                Params::Flat {
                    bytes,
                    dtype: ScaleDType::F16,
                } => Some(bytes.as_ptr()),
                _ => None,
            };
            match (stream, f16_flat(&w.scales), f16_flat(biases)) {
                // Decode of GGUF's simple blocks and f16 MLX groups: their loads without
                // `params8`'s match on the form, which per group of 32 took a third of the
                // loop's instructions at one row.
                (true, Some(scales), Some(biases)) => {
                    let f16x8 = |p: *const u8, g: usize| {
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            p.add((tile * groups + g) * TILE * 2).cast::<__m128i>(),
                        ))
                    };
                    groups_loop!(|g| (f16x8(scales, g), f16x8(biases, g)));
                }
                _ => groups_loop!(|g| (
                    params8(&w.scales, tile, groups, g),
                    params8(biases, tile, groups, g)
                )),
            }
        }
        let valid = TILE.min(w.rows - tile * TILE);
        for (t, y) in acc.iter().enumerate() {
            let dst = out.add((i0 + t) * w.rows + tile * TILE);
            if valid == TILE {
                _mm256_storeu_ps(dst, *y);
            } else {
                let mut lanes = [0f32; TILE];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *y);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, valid);
            }
        }
    }

    /// Whether 512-bit registers run the tiles at full speed: Intel's AVX-512 cores run a
    /// 512-bit `vpdpbusd` at the cost of a 256-bit one, where AMD's Zen 4 splits it into
    /// two halves (two tiles at once measured slower there, at 16–512 rows). Decided
    /// once, by the CPU's vendor.
    pub(super) fn wide_registers() -> bool {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            let id = __cpuid(0);
            // "GenuineIntel" in EBX, EDX, ECX.
            (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        })
    }

    /// Two tiles (16 weight rows, `tile` and `tile + 1`) against every activation row, in
    /// 512-bit registers: each broadcast activation quad, `vpdpbusd` and scaling step
    /// serves 16 weight rows instead of 8. Lane by lane the same integers and the same
    /// float steps as [`tile_vnni`] on each tile (groups of 32 or more), so the same bits.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_pair_vnni(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        debug_assert_ne!(w.group_size, HALF, "groups of 16 run one tile at a time");
        match w.bits {
            2 => pair_rows::<2, false>(w, x, tile, out),
            3 => pair_rows::<3, false>(w, x, tile, out),
            4 => pair_rows::<4, false>(w, x, tile, out),
            5 => pair_rows::<5, false>(w, x, tile, out),
            6 => pair_rows::<6, false>(w, x, tile, out),
            8 if w.codebook.is_some() => pair_rows::<8, true>(w, x, tile, out),
            8 => pair_rows::<8, false>(w, x, tile, out),
            _ => unreachable!("bits are checked by AffineMatrix"),
        }
    }

    #[inline(always)]
    unsafe fn pair_rows<const BITS: u32, const BOOK: bool>(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        out: *mut f32,
    ) {
        /// [`pair_tile_rows`] on tiles `tile`, `tile + 1`.
        struct Pair<'a, const BITS: u32, const BOOK: bool> {
            w: &'a PackedMatrix,
            x: &'a QuantizedRows,
            tile: usize,
            out: *mut f32,
        }
        impl<const BITS: u32, const BOOK: bool> Chunk for Pair<'_, BITS, BOOK> {
            #[inline(always)]
            unsafe fn run<const M: usize, const STREAM: bool>(&self, i0: usize) {
                pair_tile_rows::<BITS, M, BOOK, STREAM>(self.w, self.x, self.tile, i0, self.out);
            }
        }
        by_chunks(x.m, &Pair::<BITS, BOOK> { w, x, tile, out });
    }

    /// `a` in the low half, `b` in the high half.
    #[inline(always)]
    unsafe fn join(a: __m256i, b: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
    }

    #[inline(always)]
    unsafe fn join_ps(a: __m256, b: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(a)),
            _mm256_castps_pd(b),
        ))
    }

    /// [`tile_rows`] for tiles `tile`, `tile + 1` in one pass (groups of 32 or more).
    #[inline(always)]
    unsafe fn pair_tile_rows<
        const BITS: u32,
        const M: usize,
        const BOOK: bool,
        const STREAM: bool,
    >(
        w: &PackedMatrix,
        x: &QuantizedRows,
        tile: usize,
        i0: usize,
        out: *mut f32,
    ) {
        let blocks = w.cols / BLOCK;
        let tbb = tile_block_bytes(stored_bits(BITS, BOOK));
        let book = codebook::<true>(w);
        let groups = w.groups_per_row();
        let data = w.data.as_ptr().add(tile * blocks * tbb);
        let next = data.add(blocks * tbb);
        let rows = Rows::new(x, i0);
        let xq = |t: usize, value: usize| -> __m512i { _mm512_set1_epi32(rows.quad(t, value)) };
        let mut acc = [_mm512_setzero_ps(); M];
        let zero = w.zero;
        let params16 = |p: &Params, g: usize| {
            join_ps(params8(p, tile, groups, g), params8(p, tile + 1, groups, g))
        };
        let per_group = w.group_size / BLOCK;
        let biases = w
            .biases
            .as_ref()
            .expect("affine groups of 32 or more have biases");
        for g in 0..groups {
            let s = params16(&w.scales, g);
            let mut b = params16(biases, g);
            if BITS == 8 {
                b = _mm512_fmadd_ps(_mm512_set1_ps(zero as f32), s, b);
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(b, _mm512_set1_ps(rows.group_sum(t, g)), *acc);
            }
            for blk in g * per_group..(g + 1) * per_group {
                if STREAM {
                    prefetch::<BITS, BOOK>(data, blk * tbb);
                    prefetch::<BITS, BOOK>(next, blk * tbb);
                }
                let (lo, hi) = pair_block_dots::<BITS, M, BOOK>(
                    data.add(blk * tbb),
                    next.add(blk * tbb),
                    book,
                    |t, v| xq(t, blk * BLOCK + v),
                );
                for (t, acc) in acc.iter_mut().enumerate() {
                    let mut isum = _mm512_add_epi32(lo[t], hi[t]);
                    if BITS == 8 {
                        let h = rows.half_sum(t, 2 * blk) + rows.half_sum(t, 2 * blk + 1);
                        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(zero * h));
                    }
                    let sd = _mm512_mul_ps(s, _mm512_set1_ps(rows.d(t, blk)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sd, *acc);
                }
            }
        }
        let valid = (2 * TILE).min(w.rows - tile * TILE);
        let keep = ((1u32 << valid) - 1) as __mmask16;
        for (t, y) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add((i0 + t) * w.rows + tile * TILE), keep, *y);
        }
    }

    /// [`block_dots`] of two tiles' blocks (`p`: tile `t`'s, `q`: tile `t + 1`'s), their
    /// registers side by side; registers 0–3 into `lo`, 4–7 into `hi`.
    #[inline(always)]
    unsafe fn pair_block_dots<const BITS: u32, const M: usize, const BOOK: bool>(
        p: *const u8,
        q: *const u8,
        book: __m256i,
        xq: impl Fn(usize, usize) -> __m512i,
    ) -> ([__m512i; M], [__m512i; M]) {
        let mut lo = [_mm512_setzero_si512(); M];
        let mut hi = [_mm512_setzero_si512(); M];
        if BITS == 4 || BOOK {
            // Both tiles' nibbles at once.
            let mask = _mm512_set1_epi8(15);
            let book = _mm512_broadcast_i64x4(book);
            for r in 0..REGS / 2 {
                let v = join(
                    _mm256_loadu_si256(p.add(r * BLOCK).cast::<__m256i>()),
                    _mm256_loadu_si256(q.add(r * BLOCK).cast::<__m256i>()),
                );
                let mut low = _mm512_and_si512(v, mask);
                let mut high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                if BOOK {
                    low = _mm512_shuffle_epi8(book, low);
                    high = _mm512_shuffle_epi8(book, high);
                }
                for t in 0..M {
                    lo[t] = _mm512_dpbusd_epi32(lo[t], low, xq(t, r * QUAD));
                    hi[t] = _mm512_dpbusd_epi32(hi[t], high, xq(t, (r + REGS / 2) * QUAD));
                }
            }
        } else if (5..=6).contains(&BITS) {
            for r in 0..REGS / 2 {
                let (l0, h0) = register_pair::<BITS>(p, r);
                let (l1, h1) = register_pair::<BITS>(q, r);
                let (low, high) = (join(l0, l1), join(h0, h1));
                for t in 0..M {
                    lo[t] = _mm512_dpbusd_epi32(lo[t], low, xq(t, r * QUAD));
                    hi[t] = _mm512_dpbusd_epi32(hi[t], high, xq(t, (r + REGS / 2) * QUAD));
                }
            }
        } else {
            for r in 0..REGS {
                let mut v = join(register::<BITS>(p, r), register::<BITS>(q, r));
                if BITS == 8 {
                    // Back to the unsigned code, as in `block_dots`.
                    v = _mm512_xor_si512(v, _mm512_set1_epi8(-128));
                }
                for t in 0..M {
                    let sink = if r < REGS / 2 { &mut lo[t] } else { &mut hi[t] };
                    *sink = _mm512_dpbusd_epi32(*sink, v, xq(t, r * QUAD));
                }
            }
        }
        (lo, hi)
    }

    /// One block's integer dots of the tile's 8 rows with activation rows `t < M` (their
    /// 4 values from `v` on: `xq(t, v)`): values 0–15 (registers 0–3) and 16–31 (registers
    /// 4–7) apart with `SPLIT`, and also for one row of 8-bit codes, whose single chain of
    /// 8 dependent `dpbusd`s waits on their latency (a 576×49152 8-bit head at one row, two
    /// threads: 0.73–0.86 ms as one chain, 0.64–0.67 ms as two); else all in the first.
    /// (Splitting every format's one- and two-row tiles measured a 1B Q4_K_M prefill,
    /// which runs 4-row tiles, 20–25 % slower: the compiled code changed beyond those
    /// tiles.) Without `SPLIT` the caller adds them.
    /// With `BOOK`, the 4-bit indices are looked up in `book` ([`codebook`]) and the codes
    /// multiplied as 8-bit ones.
    #[inline(always)]
    unsafe fn block_dots<
        const VNNI: bool,
        const BITS: u32,
        const SPLIT: bool,
        const M: usize,
        const BOOK: bool,
    >(
        p: *const u8,
        book: __m256i,
        xq: impl Fn(usize, usize) -> __m256i,
    ) -> ([__m256i; M], [__m256i; M]) {
        let apart = SPLIT || (BITS == 8 && M == 1);
        let mut lo = [_mm256_setzero_si256(); M];
        let mut hi = [_mm256_setzero_si256(); M];
        if BOOK {
            // Registers r and r + 4 as with 4 bits, then each index's code (`vpshufb`);
            // the same integer sums as the 8-bit codes' (registers 0–3 into `lo`, 4–7
            // into `hi` when apart), in another order, which integers do not see.
            for r in 0..REGS / 2 {
                let (low, high) = register_pair::<4>(p, r);
                let (low, high) = (
                    _mm256_shuffle_epi8(book, low),
                    _mm256_shuffle_epi8(book, high),
                );
                for t in 0..M {
                    lo[t] = dot8::<VNNI>(lo[t], low, xq(t, r * QUAD));
                    let sink = if apart { &mut hi[t] } else { &mut lo[t] };
                    *sink = dot8::<VNNI>(*sink, high, xq(t, (r + REGS / 2) * QUAD));
                }
            }
        } else if (4..=6).contains(&BITS) {
            for r in 0..REGS / 2 {
                let (low, high) = register_pair::<BITS>(p, r);
                for t in 0..M {
                    lo[t] = dot::<VNNI>(lo[t], low, xq(t, r * QUAD));
                    let sink = if apart { &mut hi[t] } else { &mut lo[t] };
                    *sink = dot::<VNNI>(*sink, high, xq(t, (r + REGS / 2) * QUAD));
                }
            }
        } else {
            for r in 0..REGS {
                let v = register::<BITS>(p, r);
                // 8 bits with VNNI: back to the unsigned code (flip the top bit of code −
                // 128), whose products `dpbusd` sums in i32 without overflow; the caller
                // takes 128 · Σx off.
                let v = if BITS == 8 && VNNI {
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                } else {
                    v
                };
                for t in 0..M {
                    let sink = if apart && r >= REGS / 2 {
                        &mut hi[t]
                    } else {
                        &mut lo[t]
                    };
                    *sink = if BITS == 8 {
                        dot8::<VNNI>(*sink, v, xq(t, r * QUAD))
                    } else {
                        dot::<VNNI>(*sink, v, xq(t, r * QUAD))
                    };
                }
            }
        }
        (lo, hi)
    }

    /// Registers `r` and `r + 4` (`r < 4`) of a block of 4-, 5- or 6-bit codes, as
    /// unsigned bytes.
    #[inline(always)]
    pub(super) unsafe fn register_pair<const BITS: u32>(
        p: *const u8,
        r: usize,
    ) -> (__m256i, __m256i) {
        let v = _mm256_loadu_si256(p.add(r * BLOCK).cast::<__m256i>());
        let mask = _mm256_set1_epi8(15);
        let mut low = _mm256_and_si256(v, mask);
        let mut high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        // Bit 4 (5 bits) or bits 4–5 (6 bits) of registers r and r + 4, from the planes
        // after the nibbles (module docs), shifted into place and masked. (16-bit shifts
        // carry bits into the neighbouring byte; the mask drops them.)
        let top = p.add(4 * BLOCK).cast::<__m256i>();
        let ri = r as i32;
        if BITS == 5 {
            let plane = _mm256_loadu_si256(top);
            let bit4 = _mm256_set1_epi8(0x10);
            low = _mm256_or_si256(low, _mm256_and_si256(shift(plane, 4 - ri), bit4));
            high = _mm256_or_si256(high, _mm256_and_si256(shift(plane, -ri), bit4));
        } else if BITS == 6 {
            let (lo_plane, hi_plane) = (_mm256_loadu_si256(top), _mm256_loadu_si256(top.add(1)));
            let bits45 = _mm256_set1_epi8(0x30);
            low = _mm256_or_si256(low, _mm256_and_si256(shift(lo_plane, 4 - 2 * ri), bits45));
            high = _mm256_or_si256(high, _mm256_and_si256(shift(hi_plane, 4 - 2 * ri), bits45));
        }
        (low, high)
    }

    /// Register `r` of a block of 2-, 3- or 8-bit codes: the unsigned codes, or for 8 bits
    /// the stored code − 128 (as i8).
    #[inline(always)]
    pub(super) unsafe fn register<const BITS: u32>(p: *const u8, r: usize) -> __m256i {
        match BITS {
            2 => crumbs(p.add(8 * r)),
            3 => _mm256_or_si256(
                crumbs(p.add(8 * r)),
                _mm256_slli_epi16(plane(p.add(64 + 4 * r)), 2),
            ),
            _ => _mm256_loadu_si256(p.add(r * BLOCK).cast::<__m256i>()),
        }
    }

    /// Group `g` of scales or biases of a tile (of a matrix with `groups` groups a row):
    /// 8 rows as f32.
    #[inline(always)]
    pub(super) unsafe fn params8(params: &Params, tile: usize, groups: usize, g: usize) -> __m256 {
        let at = (tile * groups + g) * TILE;
        match params {
            Params::Flat { bytes, dtype } => {
                let p = bytes.as_ptr().add(at * dtype.size());
                match dtype {
                    ScaleDType::F32 => _mm256_loadu_ps(p.cast::<f32>()),
                    ScaleDType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())),
                    // bf16 is the top half of an f32.
                    ScaleDType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<__m128i>())),
                        16,
                    )),
                }
            }
            Params::Super {
                ints, factors, per, ..
            } => {
                // `per` is a power of two: shifts, not divisions, in the group loop.
                let shift = per.trailing_zeros();
                let f = (tile * (groups >> shift) + (g >> shift)) * TILE;
                let i = _mm_loadl_epi64(ints.as_ptr().add(at).cast::<__m128i>());
                _mm256_mul_ps(
                    _mm256_cvtph_ps(_mm_loadu_si128(factors.as_ptr().add(f).cast::<__m128i>())),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(i)),
                )
            }
        }
    }

    /// Asks for the codes of one block of `BITS`-bit codes (`tile_block_bytes(BITS)` from
    /// `p + at`, 4-bit indices with `BOOK`) `PREFETCH` bytes ahead into L1 and
    /// `PREFETCH_L2` bytes ahead into L2, a line at a time. Only hints: lines past the end of the codes are not read. (The
    /// count of lines is a constant, so the loop unrolls: a `step_by` over the block's
    /// bytes compiled to ~25 instructions of bookkeeping a block, as many as the dots.)
    #[inline(always)]
    unsafe fn prefetch<const BITS: u32, const BOOK: bool>(p: *const u8, at: usize) {
        for line in 0..tile_block_bytes(stored_bits(BITS, BOOK)).div_ceil(64) {
            let q = p.wrapping_add(at + 64 * line);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH).cast::<i8>());
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(PREFETCH_L2).cast::<i8>());
        }
    }

    /// `acc` plus the products of 8-bit codes `v` with activations `x`: with VNNI `v` holds
    /// the unsigned codes; without, code − 128, multiplied signed × signed as |v| × (x with
    /// v's sign).
    #[inline(always)]
    unsafe fn dot8<const VNNI: bool>(acc: __m256i, v: __m256i, x: __m256i) -> __m256i {
        if VNNI {
            dot::<VNNI>(acc, v, x)
        } else {
            dot::<VNNI>(acc, _mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v))
        }
    }

    /// `w`'s codebook as [`dot8`] takes its codes, in both 16-byte lanes (for `vpshufb`):
    /// unsigned with VNNI, else code − 128. Zeros without a codebook.
    #[inline(always)]
    pub(super) unsafe fn codebook<const VNNI: bool>(w: &PackedMatrix) -> __m256i {
        let Some(book) = &w.codebook else {
            return _mm256_setzero_si256();
        };
        let stored = _mm_loadu_si128(book.as_ptr().cast::<__m128i>());
        let codes = if VNNI {
            _mm_xor_si128(stored, _mm_set1_epi8(-128))
        } else {
            stored
        };
        _mm256_broadcastsi128_si256(codes)
    }

    /// `acc` plus u8 × i8 products summed in fours (per lane: one row, 4 values).
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(acc, u, s)
        } else {
            // Pair sums fit i16: at most 2 · 128 · 127 (8-bit magnitudes) or 2 · 63 · 127.
            let pairs = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    /// `v` shifted left by `s` bits in 16-bit lanes (right by `−s` for negative `s`; the
    /// callers' `s` are constants once their loop unrolls).
    #[inline(always)]
    unsafe fn shift(v: __m256i, s: i32) -> __m256i {
        if s >= 0 {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(s))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(-s))
        }
    }

    /// 8 bytes of 2-bit values → byte `v` from bits `2·(v / 8)` of byte `v % 8`. (16-bit
    /// shifts pull the next byte's bits into the top of each byte; the mask drops them.)
    #[inline(always)]
    unsafe fn crumbs(p: *const u8) -> __m256i {
        let v = _mm_loadl_epi64(p.cast::<__m128i>());
        let a = _mm_unpacklo_epi64(v, _mm_srli_epi16(v, 2));
        let b = _mm_unpacklo_epi64(_mm_srli_epi16(v, 4), _mm_srli_epi16(v, 6));
        _mm256_and_si256(_mm256_set_m128i(b, a), _mm256_set1_epi8(3))
    }

    /// A 32-bit plane → byte `v` = bit `v` (0 or 1).
    #[inline(always)]
    unsafe fn plane(p: *const u8) -> __m256i {
        let bits = _mm256_set1_epi32(p.cast::<i32>().read_unaligned());
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

/// `w · x` on the AVX-512 kernels with the tiles taken in pairs (the last alone when their
/// count is odd) and one at a time, as bits; `None` where the CPU lacks AVX-512 VNNI or
/// `w` has groups of 16 (never taken in pairs). For tests: the products take pairs only
/// on Intel.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn pairs_and_singles(w: &PackedMatrix, x: &QuantizedRows) -> Option<[Vec<u32>; 2]> {
    if !Isa::available().contains(&Isa::Avx512Vnni) || w.group_size == HALF {
        return None;
    }
    let tiles = w.rows.div_ceil(TILE);
    let (mut pairs, mut single) = (vec![f32::NAN; x.m * w.rows], vec![f32::NAN; x.m * w.rows]);
    // SAFETY: the CPU has AVX-512 VNNI (checked above); every tile is in range.
    #[allow(unsafe_code)]
    unsafe {
        for tile in 0..tiles {
            x86::tile_vnni(w, x, tile, single.as_mut_ptr());
        }
        for tile in (0..tiles).step_by(2) {
            if tile + 1 < tiles {
                x86::tile_pair_vnni(w, x, tile, pairs.as_mut_ptr());
            } else {
                x86::tile_vnni(w, x, tile, pairs.as_mut_ptr());
            }
        }
    }
    Some([pairs, single].map(|v| v.iter().map(|f| f.to_bits()).collect()))
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
        /// gives the scalar reference's bits, and the reference is the dequantized f32 product
        /// up to the activations' rounding (at most half a step `dx / 2` per value).
        #[test]
        fn kernels_match_reference(bits_i in 0usize..6, g_i in 0usize..3, m in prop_oneof![1usize..8, 15usize..36],
                                   n in prop_oneof![1usize..12, 120usize..260], groups in 1usize..4, dtype_i in 0usize..3,
                                   seed in any::<u64>()) {
            let (bits, gs) = (SUPPORTED_BITS[bits_i], SUPPORTED_GROUP_SIZES[g_i]);
            let k = gs * groups;
            let w = random(n * k, seed);
            let mut x = random(m * k, seed ^ 0xABCD);
            x[0] = 0.0; // zero and large values in the same block
            x[k - 1] *= 40.0;
            // Scales and biases stored as f32, f16 or bf16 (and read back exactly).
            let dtype = [ScaleDType::F32, ScaleDType::F16, ScaleDType::BF16][dtype_i];
            let a = AffineMatrix::quantize(&w, n, k, bits, gs, dtype).unwrap();
            let p = PackedMatrix::from_affine(&a);
            let flat = matches!(p.scales, Params::Flat { dtype: d, .. } if d == dtype);
            prop_assert!(flat, "scales stored as {:?}", dtype);
            prop_assert_eq!(p.dequantize(), a.dequantize());
            let back = p.to_affine().unwrap();
            prop_assert_eq!((&back.packed, &back.scales, &back.biases), (&a.packed, &a.scales, &a.biases));
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
            for &isa in Isa::available() {
                // The same sums in the same order: the same bits.
                prop_assert_eq!(p.matmul_t_on(isa, &q), reference.clone(), "{:?}", isa);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    proptest! {
        /// Tiles taken in pairs in 512-bit registers give each tile's bits, whatever the
        /// CPU's vendor (the products use them only on Intel), including a last tile of
        /// fewer than 8 rows.
        #[test]
        fn tile_pairs_give_each_tiles_bits(bits_i in 0usize..6, g_i in 0usize..3, m in 1usize..10,
                                           tiles in 2usize..6, short in 0usize..8, groups in 1usize..4,
                                           dtype_i in 0usize..3, seed in any::<u64>()) {
            let (bits, gs) = (SUPPORTED_BITS[bits_i], SUPPORTED_GROUP_SIZES[g_i]);
            let (k, n) = (gs * groups, tiles * TILE - short);
            let dtype = [ScaleDType::F32, ScaleDType::F16, ScaleDType::BF16][dtype_i];
            let a = AffineMatrix::quantize(&random(n * k, seed), n, k, bits, gs, dtype).unwrap();
            let p = PackedMatrix::from_affine(&a);
            let q = QuantizedRows::new(&random(m * k, seed ^ 0xABCD), m, k, gs);
            if let Some([pairs, single]) = pairs_and_singles(&p, &q) {
                prop_assert_eq!(pairs, single);
            }
        }
    }

    /// Every instruction set rounds activations to the same int8 values as the plain
    /// definition (ties to even: `round_ties_even`), row by row or split over threads.
    #[test]
    fn activation_rounding_is_the_same_everywhere() {
        let (m, k, gs) = (64, 4096, 64);
        let mut x = random(m * k, 7);
        // Exact ties: a block whose largest value is 127 has `inv = 1`.
        for (i, v) in x[..BLOCK].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        x[BLOCK] = f32::NAN; // a NaN rounds to a defined code
        let all = QuantizedRows::new(&x, m, k, gs);
        for (r, row) in x.chunks(k).enumerate() {
            let mut want = Vec::new();
            for block in row.chunks(BLOCK) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                want.extend(block.iter().map(|v| {
                    let q = (v * inv).round_ties_even();
                    if q.is_nan() {
                        -127
                    } else {
                        q as i8
                    }
                }));
            }
            assert_eq!(&all.qs[r * k..(r + 1) * k], &want[..], "row {r}");
            for &isa in Isa::available() {
                let (mut q, mut d) = (vec![0i8; k], vec![0f32; k / BLOCK]);
                let (mut hs, mut gsum) = (vec![0i32; k / HALF], vec![0f32; k / gs]);
                let out = Row {
                    q: &mut q,
                    d: &mut d,
                    half_sums: &mut hs,
                    group_sums: &mut gsum,
                };
                on_isa(
                    isa,
                    QuantizeRow {
                        x: row,
                        group_size: gs,
                        row: out,
                    },
                );
                assert_eq!(q, want, "{isa:?}, row {r}");
                assert_eq!(&all.d[r * k / BLOCK..(r + 1) * k / BLOCK], &d[..]);
                assert_eq!(&all.half_sums[r * k / HALF..(r + 1) * k / HALF], &hs[..]);
                assert_eq!(&all.group_sums[r * k / gs..(r + 1) * k / gs], &gsum[..]);
            }
        }
        assert_eq!(all.qs[..4], [127, -14, -14, -12]); // −14.5 and −13.5 to −14, −12.5 to −12
    }

    #[test]
    fn row_slices_and_joint_products() {
        let (k, gs) = (128, 64);
        let w = random(8 * k, 1);
        let whole = AffineMatrix::quantize(&w, 8, k, 4, gs, ScaleDType::F16).unwrap();
        let whole = PackedMatrix::from_affine(&whole);
        // Rows 5..8 on their own (padded to a tile of 8): the same values.
        let (a, b) = (whole.rows(0, 5).unwrap(), whole.rows(5, 3).unwrap());
        assert_eq!(b.dequantize(), whole.dequantize()[5 * k..]);
        // Applied together in one operation: the same products as one by one, and as the
        // whole matrix's.
        let x = random(2 * k, 3);
        let q = QuantizedRows::new(&x, 2, k, gs);
        for &isa in Isa::available() {
            let both = PackedMatrix::matmul_t_all(&[&a, &b], isa, &q);
            assert_eq!(both, vec![a.matmul_t_on(isa, &q), b.matmul_t_on(isa, &q)]);
            let y = whole.matmul_t_on(isa, &q);
            for i in 0..2 {
                assert_eq!(&y[i * 8..i * 8 + 5], &both[0][i * 5..(i + 1) * 5]);
                assert_eq!(&y[i * 8 + 5..(i + 1) * 8], &both[1][i * 3..(i + 1) * 3]);
            }
        }
    }
}
