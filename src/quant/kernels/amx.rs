//! Intel AMX (Advanced Matrix Extensions) for products of many activation rows: prefill,
//! and decode steps of several sequences.
//!
//! AMX multiplies int8 tiles of up to 16 rows × 64 bytes in one instruction: `tdpbssd C,
//! A, B` adds to `C[n][j]` (i32) the products `A[n][4p + t] · B[p][4j + t]` summed over
//! `p` and `t < 4`. That is nearly our layout: `A` is 16 rows of the activations' int8
//! values (`QuantizedRows` keeps a copy whose tiles are contiguous), and a register of a
//! weight tile (lane `4r + t` = row `r`, value `t`) is a row of `B` for 8 weight rows, so
//! two tiles side by side make the 64-byte row of a 16-column `B`. The codes are unpacked once per strip of 16
//! weight rows into a buffer of such rows, as `code − zero` (signed: then no zero point
//! needs taking off afterwards), and serve every 16 activation rows.
//!
//! The weights' scales apply per group (32 values, or 16 for Q2_K, Q3_K and Q6_K), so each
//! block (half block) is one `tdpbssd` over `K` = 32 (16) into a zeroed `C`, which is then
//! scaled into f32 accumulators with AVX-512 in the same order as the other kernels: the
//! same integers and the same fused multiply-adds, so the same bits.
//!
//! The OS must grant the tiles (Linux 5.16+, `arch_prctl(ARCH_REQ_XCOMP_PERM)`); before
//! the first use a child process runs one known product ([`granted`]), so a CPU or
//! hypervisor that lists AMX but faults on it costs a child, not this process.

use std::arch::asm;
#[allow(clippy::wildcard_imports)] // the intrinsics
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use super::x86::{params8, register, register_pair};
use super::{
    tile_block_bytes, PackedMatrix, QuantizedRows, AMX_CHUNK as CHUNK, BLOCK, QUAD, REGS, TILE,
};

/// Weight rows of a strip: the 16 i32 columns of an accumulator tile.
pub(super) const STRIP: usize = 2 * TILE;
/// Bytes of a `B` row: 4 values of each of the strip's 16 weight rows.
const B_ROW: usize = QUAD * STRIP;
/// Bytes of an unpacked block of a strip: 8 `B` rows.
const B_BLOCK: usize = REGS * B_ROW;

/// The operand of `ldtilecfg` (palette 1): rows and bytes per row of each tile.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0, 1, 2 and again 3, 4, 5 as `A` (`rows` activation rows of `k` bytes), `B`
    /// (`k / 4` rows of 64 bytes) and `C` (`rows` rows of 16 i32).
    fn new(rows: usize, k: usize) -> TileConfig {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for (t, (r, b)) in [(rows, k), (k / QUAD, B_ROW), (rows, B_ROW)]
            .into_iter()
            .enumerate()
        {
            (c.rows[t], c.colsb[t]) = (r as u8, b as u16);
            (c.rows[t + 3], c.colsb[t + 3]) = (r as u8, b as u16);
        }
        c
    }

    /// Loads this configuration (zeroing every tile) on this thread.
    #[inline(always)]
    unsafe fn load(&self) {
        asm!("ldtilecfg [{}]", in(reg) std::ptr::from_ref(self), options(nostack, readonly));
    }
}

/// Two sets of tiles `A`, `B`, `C` (0–2 and 3–5), so that one product runs while the
/// other's result is scaled: `$issue(a, stride, b)` loads `A` (rows `stride` apart) and
/// `B` (64-byte rows) and computes `C = A · B`; `$store(c)` writes `C` (64-byte rows).
macro_rules! tile_set {
    ($issue:ident, $store:ident, $a:literal, $b:literal, $c:literal) => {
        #[inline(always)]
        unsafe fn $issue(a: *const i8, a_stride: usize, b: *const i8) {
            asm!(
                concat!("tileloadd tmm", $a, ", [{a} + {sa} * 1]"),
                concat!("tileloadd tmm", $b, ", [{b} + {sb} * 1]"),
                concat!("tilezero tmm", $c),
                concat!("tdpbssd tmm", $c, ", tmm", $a, ", tmm", $b),
                a = in(reg) a,
                sa = in(reg) a_stride,
                b = in(reg) b,
                sb = in(reg) B_ROW,
                options(nostack, readonly),
            );
        }

        #[inline(always)]
        unsafe fn $store(c: *mut i32) {
            asm!(
                concat!("tilestored [{c} + {sc} * 1], tmm", $c),
                c = in(reg) c,
                sc = in(reg) B_ROW,
                options(nostack),
            );
        }
    };
}
tile_set!(issue_even, store_even, "0", "1", "2");
tile_set!(issue_odd, store_odd, "3", "4", "5");

/// Returns the tiles to their initial state, so that the OS does not save them on a
/// context switch (8 KiB a thread).
#[inline(always)]
unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// Whether this process may use AMX: the CPU lists AMX-TILE and AMX-INT8, the OS enables
/// their state (XCR0) and grants this process the tiles, and a forked child computed a
/// known product with them. Decided once.
pub fn granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // SAFETY: CPUID and XGETBV (once OSXSAVE says it is there) only read; the
        // arch_prctl call only asks for permission; the trial runs in a child.
        #[allow(unsafe_code)]
        unsafe {
            cpu_lists_amx() && os_enables_tiles() && permission() && trial_in_child()
        }
    })
}

unsafe fn cpu_lists_amx() -> bool {
    if __cpuid(0).eax < 7 {
        return false;
    }
    // CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
    let edx = __cpuid_count(7, 0).edx;
    edx >> 24 & 1 == 1 && edx >> 25 & 1 == 1
}

unsafe fn os_enables_tiles() -> bool {
    // CPUID.1:ECX bit 27 OSXSAVE (XGETBV usable); XCR0 bits 17–18: XTILECFG, XTILEDATA.
    if __cpuid(1).ecx >> 27 & 1 == 0 {
        return false;
    }
    let xcr0: u32;
    asm!("xgetbv", in("ecx") 0, out("eax") xcr0, out("edx") _, options(nomem, nostack));
    xcr0 >> 17 & 3 == 3
}

unsafe fn permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    libc::syscall(
        libc::SYS_arch_prctl,
        ARCH_REQ_XCOMP_PERM,
        XFEATURE_XTILEDATA,
    ) == 0
}

/// Runs a 16 × 16 × 64 product in a forked child and compares it with the plain sums
/// computed here; true only if the child exited cleanly with the right answer. The child
/// touches only memory prepared before the fork (no allocation, no lock), as a fork of a
/// threaded process requires.
unsafe fn trial_in_child() -> bool {
    const N: usize = 16;
    const K: usize = 64;
    let value = |i: usize| ((i * 37 + 11) % 255) as i8;
    let a: [i8; N * K] = std::array::from_fn(value);
    let b: [i8; K / QUAD * B_ROW] = std::array::from_fn(|i| value(i + 5));
    let want: [i32; N * N] = std::array::from_fn(|at| {
        let (n, j) = (at / N, at % N);
        (0..K)
            .map(|v| {
                i32::from(a[n * K + v]) * i32::from(b[(v / QUAD) * B_ROW + QUAD * j + v % QUAD])
            })
            .sum()
    });
    let mut got = [0i32; N * N];
    let config = TileConfig::new(N, K);
    match libc::fork() {
        -1 => false,
        0 => {
            config.load();
            issue_even(a.as_ptr(), K, b.as_ptr());
            store_even(got.as_mut_ptr());
            release();
            libc::_exit(i32::from(got != want));
        }
        child => {
            let mut status = 0;
            libc::waitpid(child, &raw mut status, 0) == child
                && libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == 0
        }
    }
}

thread_local! {
    /// A strip's codes as `B` rows, `[blocks, 8, 64]` (reused: no allocation per product).
    static UNPACKED: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
}

/// Strips `strips` (16 weight rows each: tiles `2s`, `2s + 1`) of `w` times every
/// activation row of `x`, into columns `16s..` of `out: [m, rows]`.
///
/// # Safety
/// [`granted`] is true, the CPU has the AVX-512 kernels' features, and no other thread
/// writes these columns of `out`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub(super) unsafe fn strips(
    w: &PackedMatrix,
    x: &QuantizedRows,
    strips: Range<usize>,
    out: *mut f32,
) {
    UNPACKED.with_borrow_mut(|unpacked| {
        unpacked.resize(w.cols / BLOCK * B_BLOCK, 0);
        for s in strips {
            match w.bits {
                2 => unpack::<2>(w, s, unpacked),
                3 => unpack::<3>(w, s, unpacked),
                4 => unpack::<4>(w, s, unpacked),
                5 => unpack::<5>(w, s, unpacked),
                6 => unpack::<6>(w, s, unpacked),
                8 => unpack::<8>(w, s, unpacked),
                _ => unreachable!("bits are checked by AffineMatrix"),
            }
            multiply(w, x, s, unpacked.as_ptr(), out);
        }
    });
    release();
}

/// Strip `s`'s codes into `B` rows: row `ρ` of block `b` is register `ρ` of tile `2s`
/// then of tile `2s + 1` (zeros past the last tile), each code as `code − zero`.
#[inline(always)]
unsafe fn unpack<const BITS: u32>(w: &PackedMatrix, s: usize, out: &mut [i8]) {
    let (blocks, tbb) = (w.cols / BLOCK, tile_block_bytes(BITS));
    // 8-bit codes are stored as code − 128 already (and their zero is 128).
    let zero = _mm256_set1_epi8(if BITS == 8 { 0 } else { w.zero as i8 });
    let tiles = w.rows.div_ceil(TILE);
    for half in 0..2 {
        let tile = 2 * s + half;
        let dst = out.as_mut_ptr().add(half * QUAD * TILE);
        let store = |b: usize, r: usize, v: __m256i| {
            _mm256_storeu_si256(dst.add(b * B_BLOCK + r * B_ROW).cast::<__m256i>(), v);
        };
        if tile >= tiles {
            for b in 0..blocks {
                for r in 0..REGS {
                    store(b, r, _mm256_setzero_si256());
                }
            }
            continue;
        }
        let data = w.data.as_ptr().add(tile * blocks * tbb);
        for b in 0..blocks {
            let p = data.add(b * tbb);
            if (4..=6).contains(&BITS) {
                for r in 0..REGS / 2 {
                    let (low, high) = register_pair::<BITS>(p, r);
                    store(b, r, _mm256_sub_epi8(low, zero));
                    store(b, r + REGS / 2, _mm256_sub_epi8(high, zero));
                }
            } else {
                for r in 0..REGS {
                    store(b, r, _mm256_sub_epi8(register::<BITS>(p, r), zero));
                }
            }
        }
    }
}

/// The strip's 16 scales or biases of group `g` of `groups` (zeros past the last tile).
#[inline(always)]
unsafe fn params16(
    w: &PackedMatrix,
    p: &super::Params,
    s: usize,
    groups: usize,
    g: usize,
) -> __m512 {
    let low = params8(p, 2 * s, groups, g);
    let high = if (2 * s + 1) * TILE < w.rows {
        params8(p, 2 * s + 1, groups, g)
    } else {
        _mm256_setzero_ps()
    };
    // (`insertf64x4` is AVX-512F's; `insertf32x8` would need DQ.)
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(low)),
        _mm256_castps_pd(high),
    ))
}

/// Strip `s` (unpacked at `b`) times every activation row, 16 rows at a time: one tile
/// product per part (a block, or a group of 16), the next one issued before this one's
/// result is scaled.
#[inline(always)]
unsafe fn multiply(w: &PackedMatrix, x: &QuantizedRows, s: usize, b: *const i8, out: *mut f32) {
    let (k, blocks, groups) = (w.cols, w.cols / BLOCK, w.groups_per_row());
    // Values per tile product: a block, or a group of 16.
    let part = w.group_size.min(BLOCK);
    let parts = k / part;
    // Part `j`'s block and group, by shifts (sizes are powers of two): a division costs
    // tens of cycles, a part's scaling about as many.
    let (block_shift, group_shift) = (
        (BLOCK / part).trailing_zeros(),
        (w.group_size / part).trailing_zeros(),
    );
    // Part `j`'s activations (in `x.tiled`) and unpacked weights.
    let a_at = |j: usize| j * CHUNK * part;
    let b_at = |j: usize| {
        (j >> block_shift) * B_BLOCK + (j & ((1 << block_shift) - 1)) * (part / QUAD) * B_ROW
    };
    let valid = STRIP.min(w.rows - s * STRIP);
    let keep: __mmask16 = if valid == STRIP {
        u16::MAX
    } else {
        (1 << valid) - 1
    };
    let mut c = [Products([0; CHUNK * STRIP]), Products([0; CHUNK * STRIP])];
    let mut configured = 0;
    for n0 in (0..x.m).step_by(CHUNK) {
        let rows = CHUNK.min(x.m - n0);
        if rows != configured {
            TileConfig::new(rows, part).load();
            configured = rows;
        }
        let a = x.tiled.as_ptr().add(n0 * k);
        let d = x.d.as_ptr().add(n0 * blocks);
        let sums = x.group_sums.as_ptr().add(n0 * groups);
        let mut acc = [_mm512_setzero_ps(); CHUNK];
        let (mut scale, mut scale_group) = (_mm512_setzero_ps(), usize::MAX);
        issue_even(a, part, b);
        for j in 0..parts {
            let products = &mut c[j % 2];
            if j % 2 == 0 {
                store_even(products.0.as_mut_ptr());
            } else {
                store_odd(products.0.as_mut_ptr());
            }
            if j + 1 < parts {
                let (a, b) = (a.add(a_at(j + 1)), b.add(b_at(j + 1)));
                if j % 2 == 0 {
                    issue_odd(a, part, b);
                } else {
                    issue_even(a, part, b);
                }
            }
            let (blk, g) = (j >> block_shift, j >> group_shift);
            if g != scale_group {
                (scale, scale_group) = (params16(w, &w.scales, s, groups, g), g);
            }
            // The other kernels' order: a group's bias term (`(bias + zero · scale) · Σx`
            // for 8 bits), then `acc += cvt(C) · (scale · dx)` per part.
            if let Some(biases) = w
                .biases
                .as_ref()
                .filter(|_| j & ((1 << group_shift) - 1) == 0)
            {
                let mut bias = params16(w, biases, s, groups, g);
                if w.bits == 8 {
                    bias = _mm512_fmadd_ps(_mm512_set1_ps(w.zero as f32), scale, bias);
                }
                for (n, acc) in acc.iter_mut().enumerate() {
                    if n < rows {
                        let sum = _mm512_set1_ps(*sums.add(n * groups + g));
                        *acc = _mm512_fmadd_ps(bias, sum, *acc);
                    }
                }
            }
            for (n, acc) in acc.iter_mut().enumerate() {
                if n < rows {
                    let sd = _mm512_mul_ps(scale, _mm512_set1_ps(*d.add(n * blocks + blk)));
                    let ints = _mm512_load_si512(products.0.as_ptr().add(n * STRIP).cast());
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), sd, *acc);
                }
            }
        }
        for (n, acc) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(out.add((n0 + n) * w.rows + s * STRIP), keep, *acc);
        }
    }
}

/// An accumulator tile as stored: `[16 activation rows, 16 weight rows]` i32.
#[repr(C, align(64))]
struct Products([i32; CHUNK * STRIP]);
