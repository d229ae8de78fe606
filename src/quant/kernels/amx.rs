//! Intel AMX (Advanced Matrix Extensions) for products of many activation rows: prefill,
//! and decode steps of several sequences.
//!
//! AMX multiplies int8 tiles of up to 16 rows × 64 bytes in one instruction: `tdpbssd C,
//! A, B` adds to `C[n][j]` (i32) the products `A[n][4p + t] · B[p][4j + t]` summed over
//! `p` and `t < 4`. That is nearly our layout: `A` is 16 rows of the activations' int8
//! values (`QuantizedRows` keeps a copy whose tiles are contiguous), and a register of a
//! weight tile (lane `4r + t` = row `r`, value `t`) is a row of `B` for 8 weight rows, so
//! two tiles side by side make the 64-byte row of a 16-column `B`. The codes are unpacked
//! once per strip of 32 weight rows (two `B` tiles) into a buffer of such rows, as
//! `code − zero` (signed: then no zero point needs taking off afterwards), and serve
//! every 32 activation rows (two `A` tiles).
//!
//! The weights' scales apply per group (32 values, or 16 for Q2_K, Q3_K and Q6_K), so each
//! block (half block) is a `tdpbssd` over `K` = 32 (16) into a zeroed `C`, which is then
//! scaled into f32 accumulators with AVX-512 in the same order as the other kernels: the
//! same integers and the same fused multiply-adds, so the same bits. A product cannot
//! accumulate in its tile across blocks, so the tiles' results go through memory for
//! every block; each part runs four independent products (2 `A` × 2 `B`, as llama.cpp's
//! AMX kernels do), with the f32 sums of the 32 × 32 outputs kept in memory (in
//! registers they would take 64). TSC cycles per 16 × 16 × 32 product at 4 bits, one core
//! of the 2-core Xeon VM: at 512 × 2048 × 8192, ~146 with one product at a time (16 × 16
//! outputs, sums in registers), ~110 with four, ~95 with a pair of parts scaled per load
//! and store of the sums (aligning the unpacked weights to a cache line, so that no `B`
//! row straddles two, took ~8 off the first); at 16 rows, unpacking each block just ahead
//! of its products instead of the whole strip first, 161 → 123. The scaling's row loop
//! holds no branch (one instance per pattern of bias terms: the tests and the scales
//! spilled around them were half its instructions), and with one `A` tile a part's stores
//! wait until the next part's products are issued: `qmatmul` at one thread, 576 × 3072
//! (SmolLM2's gate/up) 179 → 163 µs at 16 rows, 312 → 279 at 32, 586–609 → 525–532 at
//! 64; a 512-row prefill product of 2048 × 8192 at two threads 23.9 → 19.3 ms.
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

use super::x86::{codebook, params8, register, register_pair};
use super::{
    stored_bits, tile_block_bytes, PackedMatrix, QuantizedRows, AMX_CHUNK as CHUNK,
    AMX_STRIP_TILES, BLOCK, QUAD, REGS, TILE,
};

/// Weight rows of a strip: the 16 i32 columns of each of two accumulator tiles.
const STRIP: usize = AMX_STRIP_TILES * TILE;
/// Weight rows of a `B` tile (its columns).
const B_COLS: usize = 2 * TILE;
/// Bytes of a `B` row: 4 values of each of its 16 weight rows.
const B_ROW: usize = QUAD * B_COLS;
/// Bytes of an unpacked block of a `B` tile: 8 `B` rows.
const B_BLOCK: usize = REGS * B_ROW;
/// Activation rows multiplied at once: two `A` tiles.
const ROWS: usize = 2 * CHUNK;
/// Parts whose products are kept at once: at most three are in use (a pair being scaled
/// and the part being computed), and four make the index a mask.
const BUFFERS: usize = 4;

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
    /// `B0`, `B1` (tiles 0, 1: `k / 4` rows of 64 bytes), `A0`, `A1` (2, 3: the first 16
    /// and the rest of `rows` activation rows, `k` bytes each) and `C(a, h)` (`4 + a + 2h`:
    /// `A_a`'s rows of 16 i32). With 16 rows or fewer, `A1` and its `C`s take the odd parts
    /// (see [`round_one`]).
    fn new(rows: usize, k: usize) -> TileConfig {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        let r0 = rows.min(CHUNK);
        // `A1` and its `C`s: the second 16 rows, or with 16 rows or fewer the odd parts'.
        let r1 = if rows > CHUNK { rows - CHUNK } else { r0 };
        let tiles = [
            (k / QUAD, B_ROW),
            (k / QUAD, B_ROW),
            (r0, k),
            (r1, k),
            (r0, B_ROW),
            (r1, B_ROW),
            (r0, B_ROW),
            (r1, B_ROW),
        ];
        for (t, (r, b)) in tiles.into_iter().enumerate().filter(|(_, (r, _))| *r > 0) {
            (c.rows[t], c.colsb[t]) = (r as u8, b as u16);
        }
        c
    }

    /// Loads this configuration (zeroing every tile) on this thread.
    #[inline(always)]
    unsafe fn load(&self) {
        asm!("ldtilecfg [{}]", in(reg) std::ptr::from_ref(self), options(nostack, readonly));
    }
}

/// One part of a chunk on two `A` tiles: loads `B0`, `B1` (64-byte rows at `b0`, `b1`),
/// `A0`, `A1` (rows `stride` apart at `a0`, `a1`), computes the four `C(a, h) = A_a · B_h`
/// and stores them into `c` (64-byte rows; see [`Products`]).
#[inline(always)]
unsafe fn round_two(
    a0: *const i8,
    a1: *const i8,
    stride: usize,
    b0: *const i8,
    b1: *const i8,
    c: &mut Products,
) {
    let c = c.0.as_mut_ptr();
    asm!(
        "tileloadd tmm0, [{b0} + {sb} * 1]",
        "tileloadd tmm2, [{a0} + {sa} * 1]",
        "tilezero tmm4",
        "tdpbssd tmm4, tmm2, tmm0",
        "tileloadd tmm3, [{a1} + {sa} * 1]",
        "tilezero tmm5",
        "tdpbssd tmm5, tmm3, tmm0",
        "tileloadd tmm1, [{b1} + {sb} * 1]",
        "tilezero tmm6",
        "tdpbssd tmm6, tmm2, tmm1",
        "tilezero tmm7",
        "tdpbssd tmm7, tmm3, tmm1",
        "tilestored [{c00} + {sb} * 1], tmm4",
        "tilestored [{c10} + {sb} * 1], tmm5",
        "tilestored [{c01} + {sb} * 1], tmm6",
        "tilestored [{c11} + {sb} * 1], tmm7",
        a0 = in(reg) a0,
        a1 = in(reg) a1,
        sa = in(reg) stride,
        b0 = in(reg) b0,
        b1 = in(reg) b1,
        sb = in(reg) B_ROW,
        c00 = in(reg) c,
        c10 = in(reg) c.add(CHUNK * B_COLS),
        c01 = in(reg) c.add(ROWS * B_COLS),
        c11 = in(reg) c.add((ROWS + CHUNK) * B_COLS),
        options(nostack),
    );
}

/// [`round_two`] for part `j` of a chunk of 16 rows or fewer, without the stores: `A0`
/// (`A1` for an odd part) times `B0`, `B1` into `C(0, h)` (`C(1, h)` for an odd part),
/// which [`store_one`] stores once the next part's products are issued, so that a store
/// does not wait on the products just issued.
#[inline(always)]
unsafe fn round_one(j: usize, a0: *const i8, stride: usize, b0: *const i8, b1: *const i8) {
    // The part's `A` tile and its two `C` tiles.
    macro_rules! round {
        ($a:literal, $c0:literal, $c1:literal) => {
            asm!(
                "tileloadd tmm0, [{b0} + {sb} * 1]",
                "tileloadd tmm1, [{b1} + {sb} * 1]",
                concat!("tileloadd ", $a, ", [{a0} + {sa} * 1]"),
                concat!("tilezero ", $c0),
                concat!("tilezero ", $c1),
                concat!("tdpbssd ", $c0, ", ", $a, ", tmm0"),
                concat!("tdpbssd ", $c1, ", ", $a, ", tmm1"),
                a0 = in(reg) a0,
                sa = in(reg) stride,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                sb = in(reg) B_ROW,
                options(nostack, readonly),
            )
        };
    }
    if j % 2 == 1 {
        round!("tmm3", "tmm5", "tmm7");
    } else {
        round!("tmm2", "tmm4", "tmm6");
    }
}

/// Stores the products of part `j`'s [`round_one`] into `c`, as [`round_two`] stores
/// `C(0, h)`.
#[inline(always)]
unsafe fn store_one(j: usize, c: &mut Products) {
    let c = c.0.as_mut_ptr();
    macro_rules! store {
        ($c0:literal, $c1:literal) => {
            asm!(
                concat!("tilestored [{c00} + {sb} * 1], ", $c0),
                concat!("tilestored [{c01} + {sb} * 1], ", $c1),
                sb = in(reg) B_ROW,
                c00 = in(reg) c,
                c01 = in(reg) c.add(ROWS * B_COLS),
                options(nostack),
            )
        };
    }
    if j % 2 == 1 {
        store!("tmm5", "tmm7");
    } else {
        store!("tmm4", "tmm6");
    }
}

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

/// Runs a 32 × 32 × 64 product (all four tiles of [`round_two`]) in a forked child and
/// compares it with the plain sums computed here; true only if the child exited cleanly
/// with the right answer. The child touches only memory prepared before the fork (no
/// allocation, no lock), as a fork of a threaded process requires.
unsafe fn trial_in_child() -> bool {
    const K: usize = 64;
    const B_TILE: usize = K / QUAD * B_ROW;
    let value = |i: usize| ((i * 37 + 11) % 255) as i8;
    let a: [i8; ROWS * K] = std::array::from_fn(value);
    let b: [i8; 2 * B_TILE] = std::array::from_fn(|i| value(i + 5));
    let mut want = Products([0; 2 * ROWS * B_COLS]);
    for (at, want) in want.0.iter_mut().enumerate() {
        let (h, n, j) = (at / (ROWS * B_COLS), at / B_COLS % ROWS, at % B_COLS);
        *want = (0..K)
            .map(|v| {
                let w = b[h * B_TILE + (v / QUAD) * B_ROW + QUAD * j + v % QUAD];
                i32::from(a[n * K + v]) * i32::from(w)
            })
            .sum();
    }
    let mut got = Products([0; 2 * ROWS * B_COLS]);
    let config = TileConfig::new(ROWS, K);
    match libc::fork() {
        -1 => false,
        0 => {
            config.load();
            let (a, b) = (a.as_ptr(), b.as_ptr());
            round_two(a, a.add(CHUNK * K), K, b, b.add(B_TILE), &mut got);
            release();
            libc::_exit(i32::from(got.0 != want.0));
        }
        child => {
            let mut status = 0;
            libc::waitpid(child, &raw mut status, 0) == child
                && libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == 0
        }
    }
}

/// A thread's buffers, reused by every product: no allocation or zeroing per strip
/// (zeroing 20 KiB of products and sums per strip cost ~15 % of a 16-row product).
struct Scratch {
    /// A strip's codes as `B` rows, `[2 B tiles, blocks, 8, 64]` (plus room to start at a
    /// cache line).
    unpacked: Vec<i8>,
    /// The products of the parts in flight.
    products: [Products; BUFFERS],
    /// A chunk's f32 sums.
    acc: Accumulators,
}

thread_local! {
    static SCRATCH: RefCell<Option<Box<Scratch>>> = const { RefCell::new(None) };
}

/// Strips `strips` (32 weight rows each: tiles `4s..4s + 4`) of `w` times every
/// activation row of `x`, into columns `32s..` of `out: [m, rows]`.
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
    SCRATCH.with_borrow_mut(|scratch| {
        let scratch = scratch.get_or_insert_with(|| {
            Box::new(Scratch {
                unpacked: Vec::new(),
                products: std::array::from_fn(|_| Products([0; 2 * ROWS * B_COLS])),
                // SAFETY: zero bits are 0.0 in every lane.
                acc: Accumulators(std::mem::zeroed()),
            })
        });
        let Scratch {
            unpacked,
            products,
            acc,
        } = &mut **scratch;
        // From a cache line's start, so that no 64-byte `B` row straddles two lines.
        unpacked.resize(2 * w.cols / BLOCK * B_BLOCK + B_ROW, 0);
        let start = unpacked.as_ptr().align_offset(B_ROW);
        let unpacked = &mut unpacked[start..];
        // The rows the tiles are configured for (none yet on this thread).
        let mut configured = 0;
        let b = unpacked.as_mut_ptr();
        for s in strips {
            match w.bits {
                2 => multiply::<2, false>(w, x, s, b, products, acc, &mut configured, out),
                3 => multiply::<3, false>(w, x, s, b, products, acc, &mut configured, out),
                4 => multiply::<4, false>(w, x, s, b, products, acc, &mut configured, out),
                5 => multiply::<5, false>(w, x, s, b, products, acc, &mut configured, out),
                6 => multiply::<6, false>(w, x, s, b, products, acc, &mut configured, out),
                8 if w.codebook.is_some() => {
                    multiply::<8, true>(w, x, s, b, products, acc, &mut configured, out);
                }
                8 => multiply::<8, false>(w, x, s, b, products, acc, &mut configured, out),
                _ => unreachable!("bits are checked by AffineMatrix"),
            }
        }
    });
    release();
}

/// Block `b` of strip `s`'s codes into `B` rows: row `ρ` of the block in `B_h` is
/// register `ρ` of tile `4s + 2h` then of tile `4s + 2h + 1` (zeros past the last tile),
/// each code as `code − zero` (`BOOK`: 4-bit indices looked up in the codebook, whose
/// codes are stored as code − 128 already).
#[inline(always)]
unsafe fn unpack<const BITS: u32, const BOOK: bool>(
    w: &PackedMatrix,
    s: usize,
    b: usize,
    out: *mut i8,
) {
    let (blocks, tbb) = (w.cols / BLOCK, tile_block_bytes(stored_bits(BITS, BOOK)));
    // The codes as stored (code − 128), which the `B` rows hold.
    let book = codebook::<false>(w);
    // 8-bit codes are stored as code − 128 already (and their zero is 128).
    let zero = _mm256_set1_epi8(if BITS == 8 { 0 } else { w.zero as i8 });
    let tiles = w.rows.div_ceil(TILE);
    for quarter in 0..4 {
        let tile = AMX_STRIP_TILES * s + quarter;
        let dst = out.add(quarter / 2 * blocks * B_BLOCK + b * B_BLOCK + quarter % 2 * QUAD * TILE);
        let store = |r: usize, v: __m256i| {
            _mm256_storeu_si256(dst.add(r * B_ROW).cast::<__m256i>(), v);
        };
        if tile >= tiles {
            for r in 0..REGS {
                store(r, _mm256_setzero_si256());
            }
            continue;
        }
        let p = w.data.as_ptr().add((tile * blocks + b) * tbb);
        // The same block of the next strip, asked for a strip ahead.
        let ahead = p.wrapping_add(AMX_STRIP_TILES * blocks * tbb);
        for line in (0..tbb).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
        }
        if BOOK {
            for r in 0..REGS / 2 {
                let (low, high) = register_pair::<4>(p, r);
                store(r, _mm256_shuffle_epi8(book, low));
                store(r + REGS / 2, _mm256_shuffle_epi8(book, high));
            }
        } else if (4..=6).contains(&BITS) {
            for r in 0..REGS / 2 {
                let (low, high) = register_pair::<BITS>(p, r);
                store(r, _mm256_sub_epi8(low, zero));
                store(r + REGS / 2, _mm256_sub_epi8(high, zero));
            }
        } else {
            for r in 0..REGS {
                store(r, _mm256_sub_epi8(register::<BITS>(p, r), zero));
            }
        }
    }
}

/// The 16 scales or biases of group `g` of `groups` of the weight rows of tiles `t` and
/// `t + 1` (zeros past the last tile).
#[inline(always)]
unsafe fn params16(
    w: &PackedMatrix,
    p: &super::Params,
    t: usize,
    groups: usize,
    g: usize,
) -> __m512 {
    let low = if t * TILE < w.rows {
        params8(p, t, groups, g)
    } else {
        _mm256_setzero_ps()
    };
    let high = if (t + 1) * TILE < w.rows {
        params8(p, t + 1, groups, g)
    } else {
        _mm256_setzero_ps()
    };
    // (`insertf64x4` is AVX-512F's; `insertf32x8` would need DQ.)
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(low)),
        _mm256_castps_pd(high),
    ))
}

/// Strip `s` times every activation row, 32 rows at a time: four tile products per part
/// (a block, or a group of 16), scaled while the next part's run. The strip's codes are
/// unpacked into `b` during the first 32 rows, a block ahead of the products (so that a
/// single chunk, a decode step's, overlaps the two), and read from there by the rest.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn multiply<const BITS: u32, const BOOK: bool>(
    w: &PackedMatrix,
    x: &QuantizedRows,
    s: usize,
    b: *mut i8,
    c: &mut [Products; BUFFERS],
    acc: &mut Accumulators,
    configured: &mut usize,
    out: *mut f32,
) {
    let (k, blocks, groups) = (w.cols, w.cols / BLOCK, w.groups_per_row());
    // Values per tile product: a block, or a group of 16.
    let part = w.group_size.min(BLOCK);
    let parts = k / part;
    // Part `j`'s block and group, by shifts (sizes are powers of two).
    let (block_shift, group_shift) = (
        (BLOCK / part).trailing_zeros(),
        (w.group_size / part).trailing_zeros(),
    );
    // Part `j`'s activations (in a 16-row tile of `x.tiled`) and unpacked weights (in `B0`).
    let a_at = |j: usize| j * CHUNK * part;
    let b_at = |j: usize| {
        (j >> block_shift) * B_BLOCK + (j & ((1 << block_shift) - 1)) * (part / QUAD) * B_ROW
    };
    let b1 = b.add(blocks * B_BLOCK);
    let mut unpacked = 0;
    // The valid columns of each half of the strip.
    let keep: [__mmask16; 2] = std::array::from_fn(|h| {
        let valid = w.rows.saturating_sub(s * STRIP + h * B_COLS).min(B_COLS);
        ((1u32 << valid) - 1) as __mmask16
    });
    // Parts are scaled in pairs, after the next part's products are issued: each
    // accumulator is then loaded and stored once for two parts, and the scaling does not
    // read what a tile store has just written.
    for n0 in (0..x.m).step_by(ROWS) {
        let rows = ROWS.min(x.m - n0);
        if rows != *configured {
            TileConfig::new(rows, part).load();
            *configured = rows;
        }
        let a0 = x.tiled.as_ptr().add(n0 * k);
        let a1 = a0.wrapping_add(CHUNK * k);
        acc.0[..rows].fill([_mm512_setzero_ps(); 2]);
        // The next strip's outputs for these rows, asked for now: they are written a
        // whole chunk later. Rows of a wide output are pages apart, more streams than the
        // hardware prefetcher follows, and each write would wait for its line (a head of
        // 49,152 rows at 64 activation rows: ~143 cycles a product, against ~104 with an
        // output of 8,192).
        if (s + 1) * STRIP < w.rows {
            for n in n0..n0 + rows {
                let next = out.wrapping_add(n * w.rows + (s + 1) * STRIP).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(next);
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64));
            }
        }
        let mut at = Scaling {
            w,
            s,
            rows,
            blocks,
            groups,
            block_shift,
            group_shift,
            d: x.d.as_ptr().add(n0 * blocks),
            sums: x.group_sums.as_ptr().add(n0 * groups),
            scale: [_mm512_setzero_ps(); 2],
            scale_group: usize::MAX,
        };
        // Parts `next..` are computed but not yet scaled; a pair is scaled once the part
        // after it is stored too.
        let mut next = 0;
        for j in 0..parts {
            if n0 == 0 {
                // Blocks up to the next part's, unpacked.
                while unpacked < blocks.min((j >> block_shift) + 2) {
                    unpack::<BITS, BOOK>(w, s, unpacked, b);
                    unpacked += 1;
                }
            }
            let (aj, bj) = (a_at(j), b_at(j));
            // Parts whose products are stored: with one `A` tile, this part's are stored
            // during the next.
            let stored = if rows > CHUNK {
                round_two(
                    a0.add(aj),
                    a1.add(aj),
                    part,
                    b.add(bj),
                    b1.add(bj),
                    &mut c[j % BUFFERS],
                );
                j + 1
            } else {
                round_one(j, a0.add(aj), part, b.add(bj), b1.add(bj));
                if j > 0 {
                    store_one(j - 1, &mut c[(j - 1) % BUFFERS]);
                }
                j
            };
            if stored >= next + 3 {
                let pair = [&c[next % BUFFERS], &c[(next + 1) % BUFFERS]];
                scaled::<2>(&mut at, next, pair, acc);
                next += 2;
            }
        }
        if rows <= CHUNK {
            store_one(parts - 1, &mut c[(parts - 1) % BUFFERS]);
        }
        while next < parts {
            if next + 1 < parts {
                let pair = [&c[next % BUFFERS], &c[(next + 1) % BUFFERS]];
                scaled::<2>(&mut at, next, pair, acc);
                next += 2;
            } else {
                scaled::<1>(&mut at, next, [&c[next % BUFFERS]], acc);
                next += 1;
            }
        }
        for (n, acc) in acc.0.iter().enumerate().take(rows) {
            for (h, (&keep, &acc)) in keep.iter().zip(acc).enumerate() {
                if keep != 0 {
                    let at = (n0 + n) * w.rows + s * STRIP + h * B_COLS;
                    _mm512_mask_storeu_ps(out.add(at), keep, acc);
                }
            }
        }
    }
}

/// What scaling a part's products needs: the strip, the chunk's activation scales and
/// group sums, and the scales of the last group seen.
struct Scaling<'a> {
    w: &'a PackedMatrix,
    s: usize,
    rows: usize,
    blocks: usize,
    groups: usize,
    /// Part `j`'s block is `j >> block_shift`, its group `j >> group_shift` (a division
    /// would cost tens of cycles, a part's scaling about as many).
    block_shift: u32,
    group_shift: u32,
    d: *const f32,
    sums: *const f32,
    /// Of each half of the strip.
    scale: [__m512; 2],
    scale_group: usize,
}

/// Adds the products of parts `j..j + N` (as stored in `products`) into `acc`, in the
/// other kernels' order: per part, a group's bias term (`(bias + zero · scale) · Σx` for
/// 8 bits) at the group's first part, then `acc += cvt(C) · (scale · dx)`. Taking two
/// parts at once loads and stores each accumulator once for both.
#[inline(always)]
unsafe fn scaled<const N: usize>(
    at: &mut Scaling,
    j: usize,
    products: [&Products; N],
    acc: &mut Accumulators,
) {
    let w = at.w;
    let (blocks, groups) = (at.blocks, at.groups);
    // The strip's two halves: tiles `t`, `t + 1` and `t + 2`, `t + 3`.
    let t = AMX_STRIP_TILES * at.s;
    let mut blk = [0; N];
    let mut group = [0; N];
    let mut scale = [[_mm512_setzero_ps(); 2]; N];
    let mut bias = [None; N];
    for p in 0..N {
        let (b, g) = ((j + p) >> at.block_shift, (j + p) >> at.group_shift);
        if g != at.scale_group {
            at.scale = [
                params16(w, &w.scales, t, groups, g),
                params16(w, &w.scales, t + 2, groups, g),
            ];
            at.scale_group = g;
        }
        (blk[p], group[p], scale[p]) = (b, g, at.scale);
        if let Some(biases) = w.biases.as_ref() {
            if (j + p) & ((1 << at.group_shift) - 1) == 0 {
                let mut b = [
                    params16(w, biases, t, groups, g),
                    params16(w, biases, t + 2, groups, g),
                ];
                if w.bits == 8 {
                    let zero = _mm512_set1_ps(w.zero as f32);
                    b[0] = _mm512_fmadd_ps(zero, at.scale[0], b[0]);
                    b[1] = _mm512_fmadd_ps(zero, at.scale[1], b[1]);
                }
                bias[p] = Some(b);
            }
        }
    }
    let biased = (0..N)
        .filter(|&p| bias[p].is_some())
        .fold(0u8, |m, p| m | 1 << p);
    let c: [*const i32; N] = std::array::from_fn(|p| products[p].0.as_ptr());
    let d: [*const f32; N] = std::array::from_fn(|p| at.d.add(blk[p]));
    let sums: [*const f32; N] = std::array::from_fn(|p| at.sums.add(group[p]));
    let bias = bias.map(|b| b.unwrap_or([_mm512_setzero_ps(); 2]));
    let rows = Rows {
        c,
        d,
        sums,
        scale,
        bias,
        n: at.rows,
        blocks,
        groups,
    };
    // One instance per pattern of the parts' bias terms, so that the row loop holds no
    // branch: it was half scalar work (tests, spilled scales) beside 8 vector operations.
    match biased {
        0b00 => rows.scale::<0b00>(acc),
        0b01 => rows.scale::<0b01>(acc),
        0b10 => rows.scale::<0b10>(acc),
        _ => rows.scale::<0b11>(acc),
    }
}

/// The operands of [`scaled`]'s row loop: per part, its products, the chunk's activation
/// scales and group sums at its block and group, its weight scales and bias terms.
struct Rows<const N: usize> {
    c: [*const i32; N],
    d: [*const f32; N],
    sums: [*const f32; N],
    scale: [[__m512; 2]; N],
    bias: [[__m512; 2]; N],
    n: usize,
    blocks: usize,
    groups: usize,
}

impl<const N: usize> Rows<N> {
    /// `acc[n] += Σ_p (bias_p · Σx[n] if bit p of `BIAS`) + cvt(C_p[n]) · (scale_p · dx_p[n])`,
    /// in that order, for every row `n` (parts `p < N`).
    #[inline(always)]
    unsafe fn scale<const BIAS: u8>(&self, acc: &mut Accumulators) {
        for (n, acc) in acc.0.iter_mut().enumerate().take(self.n) {
            let mut dx = [_mm512_setzero_ps(); N];
            let mut sums = [_mm512_setzero_ps(); N];
            for p in 0..N {
                dx[p] = _mm512_set1_ps(*self.d[p].add(n * self.blocks));
                if BIAS >> p & 1 != 0 {
                    sums[p] = _mm512_set1_ps(*self.sums[p].add(n * self.groups));
                }
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let mut sum = *acc;
                for p in 0..N {
                    if BIAS >> p & 1 != 0 {
                        sum = _mm512_fmadd_ps(self.bias[p][h], sums[p], sum);
                    }
                    let ints = _mm512_load_si512(self.c[p].add((h * ROWS + n) * B_COLS).cast());
                    let sd = _mm512_mul_ps(self.scale[p][h], dx[p]);
                    sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), sd, sum);
                }
                *acc = sum;
            }
        }
    }
}

/// A part's four accumulator tiles as stored: `[2 halves of the strip, 32 activation rows,
/// 16 weight rows]` i32 (`C(a, h)` at rows `16a..` of half `h`).
#[repr(C, align(64))]
struct Products([i32; 2 * ROWS * B_COLS]);

/// A chunk's f32 sums: `[32 activation rows, 2 halves of the strip]` of 16 weight rows.
#[repr(C, align(64))]
struct Accumulators([[__m512; 2]; ROWS]);
