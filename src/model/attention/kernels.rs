//! Attention's arithmetic on the CPU over one task's keys: the scores of a block of queries
//! against runs of keys ([`score`]), their partial softmaxes and weighted values
//! ([`soften`], [`weigh_values`]), compiled for each instruction set ([`weigh_on`]). The
//! module above plans the tasks and merges what they leave.

use std::ops::Range;

use super::{Elem, Run};
use crate::engine::kv::storage::KEY_PAD;
use crate::model::math::{exp, max, sum};
use crate::quant::kernels::{on_isa, IsaKernel};
use crate::quant::Isa;

/// Keys scored at once (one AVX-512 register, two AVX2 ones).
const LANES: usize = 16;
/// Elements after the fresh keys, so that scoring the last `LANES` keys of a run never
/// reads out of bounds (the cache pads its keys by as many).
pub(super) const PAD: usize = LANES;
const _: () = assert!(
    LANES <= KEY_PAD,
    "the cache's keys must be padded for a full lane"
);

/// [`weigh`] compiled for the instruction set `isa` ([`on_isa`]: the loops are plain Rust;
/// compiled with AVX2 or AVX-512 enabled they run 8 or 16 lanes wide with fused
/// multiply-adds) and specialised for the common head sizes.
#[allow(clippy::too_many_arguments)]
pub(super) fn weigh_on<T: Elem>(
    isa: Isa,
    hd: usize,
    queries: &[f32],
    runs: &[Run<'_, T>],
    n: usize,
    scratch: Scratch<'_>,
    out: &mut [f32],
) {
    /// One call of [`weigh`] for head size `HD`.
    struct Weigh<'a, 'r, T, const HD: usize> {
        hd: usize,
        queries: &'a [f32],
        runs: &'a [Run<'r, T>],
        n: usize,
        scratch: Scratch<'a>,
        out: &'a mut [f32],
    }
    impl<T: Elem, const HD: usize> IsaKernel for Weigh<'_, '_, T, HD> {
        type Out = ();

        #[inline(always)]
        fn run<const SIMD: bool>(self) {
            let Weigh {
                hd,
                queries,
                runs,
                n,
                scratch,
                out,
            } = self;
            weigh::<T, HD, SIMD>(hd, queries, runs, n, scratch, out);
        }
    }
    macro_rules! on {
        ($hd:literal) => {
            on_isa(
                isa,
                Weigh::<T, $hd> {
                    hd,
                    queries,
                    runs,
                    n,
                    scratch,
                    out,
                },
            )
        };
    }
    match hd {
        64 => on!(64),
        128 => on!(128),
        // Gemma 3.
        256 => on!(256),
        _ => on!(0),
    }
}

/// `scores: [queries, n + LANES]` (a row of `n` scores per query, then room for a last
/// register of them) ← each query (`queries: [_, hd]`, scaled) times the `n` keys of
/// `runs`: [`weigh`]'s first phase; returns the rows' stride, `n + LANES`. A score depends
/// on its query and key alone, so a row scored in a block of rows gets the bits it gets
/// alone.
#[inline(always)]
pub(super) fn score<T: Elem, const HD: usize, const FMA: bool>(
    hd: usize,
    queries: &[f32],
    runs: &[Run<'_, T>],
    n: usize,
    scores: &mut Vec<f32>,
) -> usize {
    // Every score read is written first: the buffer only grows, and is not cleared.
    let stride = n + LANES;
    let len = queries.len() / hd * stride;
    if scores.len() < len {
        scores.resize(len, 0.0);
    }
    let mut at = 0;
    // Runs are small (a block's keys are 2–4 KB) and scattered, too short for the hardware
    // prefetcher to learn: ask for each run's keys two runs ahead, and for its values
    // while its keys are scored (they are needed once every score is known).
    runs.iter()
        .take(2)
        .for_each(|r| prefetch(r.keys, r.k_at, r.k_stride, hd, 1));
    for (i, run) in runs.iter().enumerate() {
        if let Some(r) = runs.get(i + 2) {
            prefetch(r.keys, r.k_at, r.k_stride, hd, 1);
        }
        prefetch(run.values, run.v_at, run.v_stride, run.n, hd);
        for j in (0..run.n).step_by(LANES) {
            // Up to `SCORED` queries at a time: more sums than registers hold would spill.
            // All `LANES` scores are stored: those past the run are the next run's
            // positions (written over when it is scored) or the row's spare room.
            let mut first = 0;
            for batch in queries.chunks(SCORED * hd) {
                let mut put = |sums: &[[f32; LANES]]| {
                    for (g, sums) in sums.iter().enumerate() {
                        scores[(first + g) * stride + at + j..][..LANES].copy_from_slice(sums);
                    }
                };
                match batch.len() / hd {
                    1 => put(&score_keys::<T, HD, FMA, 1>(hd, batch, run, j)),
                    2 => put(&score_keys::<T, HD, FMA, 2>(hd, batch, run, j)),
                    _ => put(&score_keys::<T, HD, FMA, SCORED>(hd, batch, run, j)),
                }
                first += batch.len() / hd;
            }
        }
        at += run.n;
    }
    debug_assert_eq!(at, n);
    stride
}

/// Queries scored at once by [`score_keys`]: their sums, 4 × 16 lanes each, take 12 of
/// AVX-512's 32 registers. Four queries' sums (a 1 KB array) went partly through the stack,
/// the compiler no longer splitting the array into registers: 30 SmolLM2 layers of a
/// 512-row prompt took 162 ms of attention with four, 143–148 with three.
pub(super) const SCORED: usize = 3;

/// The scores of `NQ` queries (`queries: [NQ, hd]`) against keys `j..j + LANES` of
/// `run`. Dimensions outermost: each row of the transposed keys is widened to f32 once,
/// in a register, and multiplied into every query's sums, four per query (independent
/// chains of multiply-adds: dimension `d` into sum `d % 4`, the dimensions past a
/// multiple of 4 into the first), added as `(s0 + s1) + (s2 + s3)`. A run's last group of
/// keys reads past it into storage that `PAD` keeps in bounds; those lanes are garbage.
#[inline(always)]
fn score_keys<T: Elem, const HD: usize, const FMA: bool, const NQ: usize>(
    hd: usize,
    queries: &[f32],
    run: &Run<'_, T>,
    j: usize,
) -> [[f32; LANES]; NQ] {
    let hd = if HD == 0 { hd } else { HD };
    let queries: [&[f32]; NQ] = std::array::from_fn(|g| &queries[g * hd..][..hd]);
    // Rows `d < hd` of these keys: `LANES` elements at `d * stride`. One bounds check here
    // rather than one per row (two compares and branches per 16 multiply-adds by 3).
    let stride = run.k_stride;
    let keys = &run.keys[run.k_at + j..][..(hd - 1) * stride + LANES];
    let key = |d: usize| -> &[T; LANES] {
        debug_assert!(d < hd);
        // SAFETY: `d < hd`, so `d * stride + LANES <= keys.len()`.
        #[allow(unsafe_code)]
        unsafe {
            &*keys.as_ptr().add(d * stride).cast::<[T; LANES]>()
        }
    };
    let mut acc = [[[0f32; LANES]; 4]; NQ];
    for d4 in 0..hd / 4 {
        for i in 0..4 {
            let d = 4 * d4 + i;
            let k = T::widen16::<FMA>(key(d));
            for (acc, query) in acc.iter_mut().zip(&queries) {
                let qd = query[d];
                for (a, &k) in acc[i].iter_mut().zip(&k) {
                    *a = fma::<FMA>(qd, k, *a);
                }
            }
        }
    }
    for d in hd / 4 * 4..hd {
        let k = T::widen16::<FMA>(key(d));
        for (acc, query) in acc.iter_mut().zip(&queries) {
            let qd = query[d];
            for (a, &k) in acc[0].iter_mut().zip(&k) {
                *a = fma::<FMA>(qd, k, *a);
            }
        }
    }
    // Plain loops: `map` with `from_fn` here became a call per query, spilling every sum.
    let mut sums = [[0f32; LANES]; NQ];
    for (sums, acc) in sums.iter_mut().zip(&acc) {
        for (l, s) in sums.iter_mut().enumerate() {
            *s = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
        }
    }
    sums
}

/// Partial attention of `queries: [_, head_dim]` over the `n` keys of `runs`: for each
/// segment in `scratch` (a query and a range of the keys), `[max, Σ w, Σ w·v]` into `out`
/// at the segment's offset, with `w = exp(q·k − max)` (the queries come scaled).
/// `scratch`: the scores and the segments (filled by the caller). `HD` is the head size
/// when it is known at compile time (0: `hd`): fixed lengths let the loops unroll and the
/// sums stay in registers while the keys and values stream past.
#[inline(always)]
fn weigh<T: Elem, const HD: usize, const FMA: bool>(
    hd: usize,
    queries: &[f32],
    runs: &[Run<'_, T>],
    n: usize,
    (scores, segments): Scratch<'_>,
    out: &mut [f32],
) {
    let hd = if HD == 0 { hd } else { HD };
    let stride = score::<T, HD, FMA>(hd, queries, runs, n, scores);
    soften::<T, HD, FMA>(hd, runs, n, stride, scores, segments, out);
}

/// A task's buffers: the scores and the segments to compute (see [`soften`]).
type Scratch<'a> = (&'a mut Vec<f32>, &'a mut Vec<Segment>);

/// A partial softmax to compute: query `query`'s keys `keys` (indices into the scored
/// keys) into `[max, Σ w, Σ w·v (head_dim)]` at `out` in the output.
pub(super) struct Segment {
    pub(super) query: usize,
    pub(super) keys: Range<usize>,
    pub(super) out: usize,
}

/// Each segment's partial softmax into `out` from `scores: [queries, stride]` (the first
/// `n` of a row are its scores; turned into weights in place) and the values of `runs`.
#[inline(always)]
fn soften<T: Elem, const HD: usize, const FMA: bool>(
    hd: usize,
    runs: &[Run<'_, T>],
    n: usize,
    stride: usize,
    scores: &mut [f32],
    segments: &[Segment],
    out: &mut [f32],
) {
    debug_assert!(segments.iter().all(|s| s.keys.end <= n));
    for seg in segments {
        let scores = &mut scores[seg.query * stride..][seg.keys.clone()];
        let max = max(scores);
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let out = &mut out[seg.out..seg.out + 2 + hd];
        out[0] = max;
        out[1] = sum(scores, |s| s);
    }
    // `Σ w·v`: the segments over the same keys (the query heads of one row and split)
    // together, up to `SCORED` at a time, so that each value is widened once for them all.
    let mut first = 0;
    while first < segments.len() {
        let keys = &segments[first].keys;
        let same = segments[first..]
            .iter()
            .take(SCORED)
            .take_while(|s| s.keys == *keys)
            .count();
        let group = &segments[first..first + same];
        match same {
            1 => weigh_values::<T, HD, FMA, 1>(hd, runs, stride, scores, group, out),
            2 => weigh_values::<T, HD, FMA, 2>(hd, runs, stride, scores, group, out),
            _ => weigh_values::<T, HD, FMA, SCORED>(hd, runs, stride, scores, group, out),
        }
        first += same;
    }
}

/// Dimensions of the values weighed at once by [`weigh_values`]: `NQ` sums of 64 f32 are
/// 4 AVX-512 registers a query.
pub(super) const WEIGHED: usize = 64;

/// `Σ w·v` of `NQ` segments over the same keys (`segments`; their weights in `scores:
/// [queries, stride]`) into `out`, `WEIGHED` dimensions at a time: each key's values
/// widened to f32 once, in registers, and multiplied into every segment's sums. Each sum
/// runs key by key in order, so it is the same however the keys fall into runs (cached or
/// fresh) or segments share them: a row's result does not depend on its batch.
#[inline(always)]
fn weigh_values<T: Elem, const HD: usize, const FMA: bool, const NQ: usize>(
    hd: usize,
    runs: &[Run<'_, T>],
    stride: usize,
    scores: &[f32],
    segments: &[Segment],
    out: &mut [f32],
) {
    let hd = if HD == 0 { hd } else { HD };
    let keys = segments[0].keys.clone();
    let weights: [&[f32]; NQ] =
        std::array::from_fn(|g| &scores[segments[g].query * stride..][keys.clone()]);
    for dims in (0..hd).step_by(WEIGHED) {
        let len = WEIGHED.min(hd - dims);
        let mut acc = [[0f32; WEIGHED]; NQ];
        let mut at = 0;
        for run in runs {
            // The run's keys among the segments': `lo..hi`, as indices of the row's keys.
            let (lo, hi) = (keys.start.max(at), keys.end.min(at + run.n));
            at += run.n;
            if lo >= hi {
                continue;
            }
            let values = &run.values[run.v_at + (lo - (at - run.n)) * run.v_stride + dims..];
            let weights: [&[f32]; NQ] =
                std::array::from_fn(|g| &weights[g][lo - keys.start..hi - keys.start]);
            for i in 0..hi - lo {
                let value = &values[i * run.v_stride..][..len];
                let mut v = [0f32; WEIGHED];
                if len == WEIGHED {
                    for (v, value) in v.chunks_exact_mut(16).zip(value.chunks_exact(16)) {
                        let value = value.try_into().expect("16 values");
                        v.copy_from_slice(&T::widen16::<FMA>(value));
                    }
                } else {
                    v.iter_mut().zip(value).for_each(|(v, x)| *v = x.to_f32());
                }
                for (acc, weights) in acc.iter_mut().zip(&weights) {
                    let p = weights[i];
                    for (a, &x) in acc.iter_mut().zip(&v) {
                        *a = fma::<FMA>(p, x, *a);
                    }
                }
            }
        }
        for (seg, acc) in segments.iter().zip(&acc) {
            out[seg.out + 2 + dims..][..len].copy_from_slice(&acc[..len]);
        }
    }
}

/// Asks the CPU to start loading `rows` rows of `len` elements, `data[at + r * stride..]`,
/// into its caches (a hint: nothing is read, nothing can fault).
#[inline(always)]
fn prefetch<T>(data: &[T], at: usize, stride: usize, rows: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let line = (64 / std::mem::size_of::<T>()).max(1);
        let ask = |e: usize| {
            // SAFETY: a prefetch only hints; it reads nothing and never faults, even for
            // an address outside `data`.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(e).cast::<i8>());
            }
        };
        if stride <= line || stride == len {
            // Every line of the span is read (a cached block's transposed keys, 16 f16
            // apart, or its values, one row after another): each asked for once. Row by
            // row, the keys took 64 prefetches (and their address arithmetic) for 32
            // lines: ~20 % of a long context's attention instructions.
            let (mut e, end) = (at, at + rows.saturating_sub(1) * stride + len);
            while e < end {
                ask(e);
                e += line;
            }
        } else {
            for r in 0..rows {
                let (mut e, end) = (at + r * stride, at + r * stride + len);
                while e < end {
                    ask(e);
                    e += line;
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, stride, rows, len);
}

/// `a · b + c`, fused into one instruction where the caller's instruction set has it
/// (`f32::mul_add` without hardware support is a slow library call).
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}
