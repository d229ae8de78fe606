//! Paged attention on the CPU: keys and values live in fixed-size blocks, and each sequence
//! reads its own blocks through a block table (vLLM's PagedAttention, Kwon et al. 2023).
//!
//! A forward pass carries the rows of several sequences side by side (each a chunk of its
//! prompt or one decode token). Attention for a query reads the keys already cached for
//! its sequence plus the fresh keys of its own chunk up to itself; the fresh keys are
//! written into the cache afterwards, so a ring (the rotating cache) can never overwrite a
//! key that a query of the same chunk still needs.
//!
//! This module is the math (here the tasks, their keys and the merging of their partial
//! softmaxes; in `kernels.rs` the arithmetic on one task's keys); the memory is
//! [`KvStorage`] (`engine/kv/storage.rs`), read and written only through its layout and its
//! per-layer arrays.
//!
//! Cost per layer: O(rows · visible keys · heads · head_dim), split into tasks of at most
//! `KEYS_PER_TASK` keys (flash-decoding) so that a single long sequence uses every thread.

mod kernels;

use std::borrow::Cow;
use std::ops::Range;

use crate::engine::kv::{KvLayout, KvStorage, LayerKv, LayerKvMut, Ring};
use crate::quant::Isa;
use crate::threads::SendPtr;
use half::f16;
use half::slice::HalfFloatSliceExt;
use kernels::{weigh_on, Segment, PAD};

/// An element type of the cache.
pub trait Elem: Copy + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `src` into `dst` (the same length), rounded to nearest even, a vector at a time
    /// where the CPU converts in hardware.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// 16 elements as f32. `SIMD`: the caller runs with AVX2 and F16C enabled.
    fn widen16<const SIMD: bool>(x: &[Self; 16]) -> [f32; 16];
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn widen16<const SIMD: bool>(x: &[f32; 16]) -> [f32; 16] {
        *x
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn narrow(src: &[f32], dst: &mut [f16]) {
        // F16C (`vcvtps2ph`) where the CPU has it, else `f16::from_f32` per element.
        dst.convert_from_f32_slice(src);
    }

    #[inline(always)]
    fn widen16<const SIMD: bool>(x: &[f16; 16]) -> [f32; 16] {
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
            let mut out = [0f32; 16];
            // SAFETY: `SIMD` callers run with F16C and AVX enabled; both loads read 8 of
            // the 16 halves and both stores write 8 of the 16 floats.
            #[allow(unsafe_code)]
            unsafe {
                let p = x.as_ptr().cast::<std::arch::x86_64::__m128i>();
                _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(p)));
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(8),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
                );
            }
            return out;
        }
        x.map(f16::to_f32)
    }
}

/// One sequence's part of a forward pass: rows `row..row + len` of the batch hold its
/// positions `start..start + len`, and `blocks` (its block table) covers every slot they
/// need. Positions before `start` are already cached.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan<'a> {
    pub row: usize,
    pub len: usize,
    pub start: usize,
    pub blocks: &'a [u32],
    /// The table of the cache's window layers (see `WindowLayers`; empty without them):
    /// holes up to the window of the span's first position, then blocks.
    pub window_blocks: &'a [u32],
}

/// `seqs` as layer `layer` of `kv` reads and writes them: a window layer's spans carry its
/// table as `blocks`.
fn spans_of<'s, 'a>(
    kv: &KvStorage,
    layer: usize,
    seqs: &'s [SeqSpan<'a>],
) -> Cow<'s, [SeqSpan<'a>]> {
    if !kv.is_window_layer(layer) {
        return Cow::Borrowed(seqs);
    }
    let window = |s: &SeqSpan<'a>| SeqSpan {
        blocks: s.window_blocks,
        ..*s
    };
    Cow::Owned(seqs.iter().map(window).collect())
}

/// Keys whose storage is consecutive: dimension `d` of key `j < n` is at
/// `keys[k_at + d * k_stride + j]`, its value at `values[v_at + j * v_stride..][..head_dim]`.
#[derive(Debug, Clone, Copy)]
struct Run<'a, T> {
    keys: &'a [T],
    k_at: usize,
    k_stride: usize,
    values: &'a [T],
    v_at: usize,
    v_stride: usize,
    n: usize,
}

/// One layer's attention over a batch: `q: [rows, heads, head_dim]`, `k, v: [rows,
/// kv_heads, head_dim]` (RoPE already applied) → `[rows, heads * head_dim]`. Query head `h`
/// reads KV head `h / (heads / kv_heads)` (grouped-query attention, HF `repeat_kv`).
/// `window` restricts each query to the last `window` positions (sliding-window layers).
///
/// Work is split by row, KV head and range of keys (flash-decoding, Dao et al. 2023): each
/// task reads its keys and values once for all the query heads that share
/// them and leaves a partial softmax per head (its maximum score, sum of weights and
/// weighted values), which are merged at the end. The ranges depend on the row alone, so
/// a row's result does not depend on what else is in the batch. The result goes into `out`
/// (resized; no allocation once it has the capacity).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    kv: &KvStorage,
    layer: usize,
    seqs: &[SeqSpan<'_>],
    (q, k, v): (&[f32], &[f32], &[f32]),
    heads: usize,
    scale: f32,
    window: Option<usize>,
    out: &mut Vec<f32>,
) {
    attend_on(
        Isa::active(),
        kv,
        layer,
        seqs,
        (q, k, v),
        heads,
        scale,
        window,
        out,
    );
}

/// [`attend`] with its inner loops compiled for `isa` (one of `Isa::available()`).
#[allow(clippy::too_many_arguments)]
fn attend_on(
    isa: Isa,
    kv: &KvStorage,
    layer: usize,
    seqs: &[SeqSpan<'_>],
    qkv: (&[f32], &[f32], &[f32]),
    heads: usize,
    scale: f32,
    window: Option<usize>,
    out: &mut Vec<f32>,
) {
    let layout = kv.layout_of(layer);
    let seqs = &spans_of(kv, layer, seqs);
    // The thread's buffers, taken for the call (a call inside it would start empty ones).
    let mut work = WORKSPACE.take();
    match kv.layer(layer) {
        LayerKv::F32(ck, cv) => attend_in(
            isa,
            layout,
            (ck, cv),
            seqs,
            qkv,
            (heads, scale, window),
            &mut work,
            out,
        ),
        LayerKv::F16(ck, cv) => attend_in(
            isa,
            layout,
            (ck, cv),
            seqs,
            qkv,
            (heads, scale, window),
            &mut work,
            out,
        ),
    }
    if (work.q.capacity() + work.partial.capacity()) * size_of::<f32>() <= Workspace::KEEP {
        WORKSPACE.set(work);
    }
}

/// A thread's buffers for [`attend`]'s layer-sized arrays (the scaled queries and the
/// partial softmaxes), kept from layer to layer: allocated per call, they were fresh pages
/// each time, and a prompt's are megabytes (512 SmolLM2 prompt rows, 2 threads: some
/// runs took ~21,000 more page faults and ~100 ms more a prefill than others).
#[derive(Default)]
struct Workspace {
    q: Vec<f32>,
    partial: Vec<f32>,
}

impl Workspace {
    /// Bytes kept between calls: a long prompt's are let go of.
    const KEEP: usize = 64 << 20;
}

thread_local! {
    static WORKSPACE: std::cell::Cell<Workspace> = std::cell::Cell::new(Workspace::default());
}

/// [`attend_on`] over one layer's cache, `(keys, values)` in element type `T`.
#[allow(clippy::too_many_arguments)]
fn attend_in<T: Elem>(
    isa: Isa,
    kv: KvLayout,
    (cache_k, cache_v): (&[T], &[T]),
    seqs: &[SeqSpan<'_>],
    (q, k, v): (&[f32], &[f32], &[f32]),
    (heads, scale, window): (usize, f32, Option<usize>),
    work: &mut Workspace,
    out: &mut Vec<f32>,
) {
    let (hd, nkv) = (kv.head_dim, kv.kv_heads);
    let groups = heads / nkv;
    // Queries scaled once, not once per key.
    work.q.resize(q.len(), 0.0);
    let piece = crate::threads::rows_per_task(q.len(), 1);
    crate::threads::parallel_chunks_mut(&mut work.q, piece, &|i, scaled| {
        for (s, x) in scaled.iter_mut().zip(&q[i * piece..]) {
            *s = x * scale;
        }
    });
    let q = &work.q;
    // Which sequence each row belongs to.
    let row_seq: Vec<usize> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| std::iter::repeat_n(i, s.len))
        .collect();
    let rows = row_seq.len();
    let units = rows * nkv;
    // The fresh keys and values as the cache stores them (so that a position's attention to
    // itself uses what later positions will read): keys transposed, `[kv_heads, head_dim,
    // rows]`, so that a run of them is scored the same way.
    // Both over the compute threads: a prompt's are rows × kv_heads × head_dim values.
    let narrow_k = narrow_all(k);
    let mut fresh_k = vec![T::default(); nkv * hd * rows + PAD];
    let dims_per_task = crate::threads::rows_per_task(nkv * hd, rows);
    crate::threads::parallel_chunks_mut(
        &mut fresh_k[..nkv * hd * rows],
        dims_per_task * rows,
        &|task, dims| {
            // `dims`: rows `(kv_head, d)` of the transposed keys from `task`'s first on.
            for (j, dim) in dims.chunks_exact_mut(rows).enumerate() {
                let (kv_head, d) = (
                    (task * dims_per_task + j) / hd,
                    (task * dims_per_task + j) % hd,
                );
                for (row, x) in dim.iter_mut().enumerate() {
                    *x = narrow_k[(row * nkv + kv_head) * hd + d];
                }
            }
        },
    );
    let fresh_v = narrow_all(v);
    // The positions row `row` sees, in order, as two ranges: those from `first` on (the
    // sliding window's start, else 0) that a ring keeps for good, then the recent ones up to
    // the row's own. Without a ring the first range is empty. (Positions a ring has
    // overwritten are exactly those before the second range's start.)
    let positions = |row: usize| -> [Range<usize>; 2] {
        let seq = &seqs[row_seq[row]];
        let qpos = seq.start + (row - seq.row);
        let first = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        let (keep, recent) = kv
            .ring
            .map_or((0, 0), |r| (r.keep, (qpos + 1).saturating_sub(r.window)));
        let kept_end = keep.min(qpos + 1).max(first);
        [first..kept_end, first.max(keep).max(recent)..qpos + 1]
    };
    // Ranges of a row that sees `n` keys: one per `KEYS_PER_TASK`, at most `MAX_SPLITS`.
    let splits_of = |n: usize| n.div_ceil(KEYS_PER_TASK).clamp(1, MAX_SPLITS);
    // Split `split`'s keys: indices into the `n` positions a row sees.
    let split_keys =
        |split: usize, n: usize| split * n / splits_of(n)..(split + 1) * n / splits_of(n);
    let splits = (0..rows)
        .map(|row| {
            let seq = &seqs[row_seq[row]];
            splits_of(seq.start + (row - seq.row) + 1)
        })
        .max()
        .unwrap_or(1);
    let sources = Sources {
        kv,
        cache: (cache_k, cache_v),
        fresh: (&fresh_k, &fresh_v),
        rows,
    };
    // Per task and query head: [max score, sum of weights, Σ weight·value (head_dim)].
    let part = 2 + hd;
    // A (row, KV head)'s partial softmaxes, `[splits, groups, part]`.
    let per_unit = splits * groups * part;
    let partial = &mut work.partial;
    // Written whole below (every head's output by its merge), so not cleared first: that
    // was serial work.
    len_for_overwrite(out, rows * heads * hd);
    // Whether the tasks below merged each (row, head)'s splits themselves (see `merge`).
    let merged;
    // Prompt chunks: rows of a sequence in blocks of `ROWS_PER_BLOCK`, whose queries are
    // scored together against the keys the block sees, each key widened once per
    // `SCORED` queries rather than once per query head, each row's splits then softened
    // over its own keys alone: the same sums in the same order as one row at a time, so
    // the same bits. Without a ring (whose two ranges a block's rows do not share), and
    // when the blocks alone keep every thread busy.
    let blocks: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..s.len)
                .step_by(ROWS_PER_BLOCK)
                .map(move |j| (i, s.row + j))
        })
        .collect();
    if kv.ring.is_none()
        && seqs.iter().any(|s| s.len > 1)
        && blocks.len() * nkv >= 4 * crate::threads::num_threads()
    {
        // Each task merges its rows' splits into `out` itself: a 1B model's 512-row prompt
        // has 17 MB of partial softmaxes a layer, which went through memory twice.
        merged = true;
        let sink = SendPtr(out.as_mut_ptr());
        let per_row = splits * groups * part;
        crate::threads::parallel_for(blocks.len() * nkv, &|task| {
            // Tasks are claimed in order: the last blocks of a sequence (the most keys)
            // first, so that the threads finish together rather than waiting on them.
            let (block, kv_head) = (blocks.len() - 1 - task / nkv, task % nkv);
            let (s, first) = blocks[block];
            let seq = &seqs[s];
            let block_rows = first..(first + ROWS_PER_BLOCK).min(seq.row + seq.len);
            // The positions each row sees (without a ring: `positions`' second range), and
            // those the block sees.
            let sees = |row: usize| positions(row)[1].clone();
            let union = sees(first).start..sees(block_rows.end - 1).end;
            let mut runs = Vec::new();
            sources.runs(seq, kv_head, union.clone(), &mut runs);
            BUFFERS.with_borrow_mut(|b| {
                let Buffers {
                    scores,
                    segments,
                    queries,
                    partials,
                } = b;
                queries.clear();
                segments.clear();
                for (i, row) in block_rows.clone().enumerate() {
                    queries.extend_from_slice(
                        &q[(row * heads + kv_head * groups) * hd..][..groups * hd],
                    );
                    let seen = sees(row);
                    let (n, offset) = (seen.len(), seen.start - union.start);
                    // By split, so that the query heads of a split (the same keys) are
                    // consecutive.
                    for split in 0..splits_of(n) {
                        let keys = split_keys(split, n);
                        segments.extend((0..groups).map(|g| Segment {
                            query: i * groups + g,
                            keys: offset + keys.start..offset + keys.end,
                            out: i * per_row + (split * groups + g) * part,
                        }));
                    }
                }
                // Splits past a row's own stay empty partial softmaxes (zeros), as below.
                partials.clear();
                partials.resize(block_rows.len() * per_row, 0.0);
                weigh_on(
                    isa,
                    hd,
                    queries,
                    &runs,
                    union.len(),
                    (scores, segments),
                    partials,
                );
                for (i, row) in block_rows.enumerate() {
                    let unit = &partials[i * per_row..][..per_row];
                    // SAFETY: `out` holds `rows · heads · head_dim` (sized above), and each
                    // (row, KV head) belongs to one task.
                    #[allow(unsafe_code)]
                    unsafe {
                        merge_unit(&sink, row * nkv + kv_head, unit, groups, hd);
                    }
                }
                b.trim();
            });
        });
    } else {
        // A task takes one split when there are few rows (decoding: the splits are the
        // parallelism), all of a (row, KV head)'s with more, and all of a row's KV heads
        // with enough rows: a block holds the heads' keys side by side, so one task then
        // reads each block's keys and values in one run (64 SmolLM2 decode rows, 2
        // threads: attention 1.79–1.88 → 1.61–1.63 s over a run). Either way each
        // split's arithmetic is the same.
        let threads = crate::threads::num_threads();
        let per_task = if rows >= 4 * threads {
            splits * nkv
        } else if units >= 4 * threads {
            splits
        } else {
            1
        };
        // A task that holds every split of its (row, KV head)s merges them into `out`
        // (query head `h` of unit `u` at `(u · groups + h) · head_dim`), rather than
        // leaving it to a pass of its own.
        merged = per_task >= splits;
        let sink = SendPtr(out.as_mut_ptr());
        // Written whole by the tasks (each split's partial softmax, or zeros), so not
        // cleared first.
        len_for_overwrite(partial, units * per_unit);
        crate::threads::parallel_chunks_mut(
            partial,
            per_task * groups * part,
            &|task, partials| {
                // A split of up to `KEYS_PER_TASK` keys lies in at most that many blocks'
                // runs plus the fresh rows' and a ring's second range (the splits of a
                // context past `MAX_SPLITS` of them hold more and grow it): one allocation
                // a task rather than one per doubling (~4 % of a 2,000-key decode row).
                let mut runs = Vec::with_capacity(KEYS_PER_TASK / kv.block_size + 3);
                BUFFERS.with_borrow_mut(|b| {
                    let Buffers {
                        scores, segments, ..
                    } = b;
                    for (i, partial) in partials.chunks_mut(groups * part).enumerate() {
                        let (unit, split) = (
                            (task * per_task + i) / splits,
                            (task * per_task + i) % splits,
                        );
                        let (row, kv_head) = (unit / nkv, unit % nkv);
                        let [kept, recent] = positions(row);
                        let n = kept.len() + recent.len();
                        if split >= splits_of(n) {
                            // Nothing for this split: an empty partial softmax.
                            partial.fill(0.0);
                            continue;
                        }
                        // This split's keys: indices `lo..hi` of the row's visible positions.
                        let Range { start: lo, end: hi } = split_keys(split, n);
                        let seq = &seqs[row_seq[row]];
                        runs.clear();
                        let k = kept.len();
                        if lo < k {
                            let range = kept.start + lo..kept.start + hi.min(k);
                            sources.runs(seq, kv_head, range, &mut runs);
                        }
                        if hi > k {
                            let range = recent.start + lo.saturating_sub(k)..recent.start + hi - k;
                            sources.runs(seq, kv_head, range, &mut runs);
                        }
                        // The query heads that share this KV head: `[groups, head_dim]`, each over
                        // all of the split's keys.
                        let queries = &q[(row * heads + kv_head * groups) * hd..][..groups * hd];
                        segments.clear();
                        segments.extend((0..groups).map(|g| Segment {
                            query: g,
                            keys: 0..hi - lo,
                            out: g * part,
                        }));
                        weigh_on(
                            isa,
                            hd,
                            queries,
                            &runs,
                            hi - lo,
                            (scores, segments),
                            partial,
                        );
                    }
                    b.trim();
                });
                if merged {
                    let first = task * per_task / splits;
                    for (u, unit) in partials.chunks_exact(per_unit).enumerate() {
                        // SAFETY: `out` holds `rows · heads · head_dim` (sized above), and
                        // tasks hold disjoint units.
                        #[allow(unsafe_code)]
                        unsafe {
                            merge_unit(&sink, first + u, unit, groups, hd);
                        }
                    }
                }
            },
        );
    }
    if merged {
        return;
    }
    // Rows are independent: split over the threads (run serially, it kept 15 of 16 threads
    // idle for a prompt's rows × heads merges).
    let partial = &*partial;
    let rows_per_task = crate::threads::rows_per_task(rows, heads * hd * splits);
    crate::threads::parallel_chunks_mut(out, rows_per_task * heads * hd, &|task, out| {
        for (j, out) in out.chunks_mut(hd).enumerate() {
            let i = task * rows_per_task * heads + j;
            let (row, head) = (i / heads, i % heads);
            let unit = row * nkv + head / groups;
            merge(
                &partial[unit * per_unit..][..per_unit],
                groups,
                head % groups,
                out,
            );
        }
    });
}

/// `v` at length `len`, its elements left as they are (those it grows by: zeros), for a
/// caller that writes every one.
fn len_for_overwrite(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    } else {
        v.truncate(len);
    }
}

/// Each query head of `unit` (a row and KV head) from its partial softmaxes `partial:
/// [splits, groups, 2 + head_dim]` (see [`merge`]) into `out`, the layer's outputs `[rows ·
/// heads, head_dim]`: query head `h` of the unit at `(unit · groups + h) · head_dim`.
///
/// # Safety
/// `out` points to at least `(unit + 1) · groups · head_dim` floats, and nothing else reads
/// or writes this unit's while the call runs.
#[allow(unsafe_code)]
unsafe fn merge_unit(out: &SendPtr<f32>, unit: usize, partial: &[f32], groups: usize, hd: usize) {
    for h in 0..groups {
        // SAFETY: in bounds and not shared, as the caller promises.
        let out =
            unsafe { std::slice::from_raw_parts_mut(out.get().add((unit * groups + h) * hd), hd) };
        merge(partial, groups, h, out);
    }
}

/// Query head `h`'s attention from the partial softmaxes of its (row, KV head)'s splits,
/// `partial: [splits, groups, 2 + head_dim]`, into `out: [head_dim]` (overwritten): each
/// split rescaled to the largest maximum. Splits without keys (`Σ w = 0`) take no part; a
/// row always sees itself, so one has keys.
fn merge(partial: &[f32], groups: usize, h: usize, out: &mut [f32]) {
    out.fill(0.0);
    let part = 2 + out.len();
    let parts = || {
        partial
            .chunks_exact(groups * part)
            .map(|split| &split[h * part..][..part])
            .filter(|p| p[1] > 0.0)
    };
    let max = parts().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for p in parts() {
        let w = (p[0] - max).exp();
        sum += w * p[1];
        for (o, x) in out.iter_mut().zip(&p[2..]) {
            *o += w * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// Where one layer's keys and values are read from: the cache, and the batch's fresh
/// rows (keys transposed to `[kv_heads, head_dim, rows]`, values `[rows, kv_heads,
/// head_dim]`).
struct Sources<'a, T> {
    kv: KvLayout,
    cache: (&'a [T], &'a [T]),
    fresh: (&'a [T], &'a [T]),
    rows: usize,
}

impl<'a, T> Sources<'a, T> {
    /// Appends the runs (consecutive storage) that hold `positions` of `seq` for `kv_head`.
    fn runs(
        &self,
        seq: &SeqSpan<'_>,
        kv_head: usize,
        positions: Range<usize>,
        out: &mut Vec<Run<'a, T>>,
    ) {
        let kv = self.kv;
        let (hd, nkv, bs) = (kv.head_dim, kv.kv_heads, kv.block_size);
        let (mut p, end) = (positions.start, positions.end);
        while p < end {
            let run = if p < seq.start {
                // Cached: consecutive slots of one block, up to where the ring wraps.
                let wrap = match kv.ring {
                    Some(r) if p >= r.keep => r.window - (p - r.keep) % r.window,
                    Some(r) => r.keep - p,
                    None => usize::MAX,
                };
                let (base, index) = kv.place(seq.blocks, Ring::slot(kv.ring, p), kv_head);
                Run {
                    keys: self.cache.0,
                    k_at: base + index,
                    k_stride: bs,
                    values: self.cache.1,
                    v_at: base + index * hd,
                    v_stride: hd,
                    n: (end.min(seq.start) - p).min(bs - index).min(wrap),
                }
            } else {
                let row = seq.row + p - seq.start;
                Run {
                    keys: self.fresh.0,
                    k_at: kv_head * hd * self.rows + row,
                    k_stride: self.rows,
                    values: self.fresh.1,
                    v_at: (row * nkv + kv_head) * hd,
                    v_stride: nkv * hd,
                    n: end - p,
                }
            };
            p += run.n;
            out.push(run);
        }
    }
}

/// A thread's attention buffers, kept from task to task and layer to layer: allocated per
/// task, they were fresh memory each time (allocated, zeroed and faulted in by every
/// task of every layer).
#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    segments: Vec<Segment>,
    /// A block's queries, `[rows, groups, head_dim]`.
    queries: Vec<f32>,
    /// A block's partial softmaxes, `[rows, splits, groups, 2 + head_dim]`.
    partials: Vec<f32>,
}

impl Buffers {
    /// Bytes a thread keeps between tasks: a long context's scores (queries × keys) are
    /// let go of rather than held by every thread.
    const KEEP: usize = 1 << 20;

    fn trim(&mut self) {
        fn trim<T>(v: &mut Vec<T>) {
            if v.capacity() * std::mem::size_of::<T>() > Buffers::KEEP {
                *v = Vec::new();
            }
        }
        trim(&mut self.scores);
        trim(&mut self.segments);
        trim(&mut self.queries);
        trim(&mut self.partials);
    }
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers::default());
}

/// Keys per attention task (while there are at most `MAX_SPLITS` tasks per row and KV head).
/// A split costs a partial softmax and its merge: at 32 keys, 64 decode rows of ~100
/// positions spent 25.5 ms a step in attention (SmolLM2, 2 threads), at 128 20 ms; a long
/// context still gets `MAX_SPLITS` tasks.
const KEYS_PER_TASK: usize = 128;
const MAX_SPLITS: usize = 8;
/// Prompt rows scored together (see `attend_in`).
const ROWS_PER_BLOCK: usize = 8;

/// `xs` as the cache stores them, over the compute threads.
fn narrow_all<T: Elem>(xs: &[f32]) -> Vec<T> {
    let mut out = vec![T::default(); xs.len()];
    let piece = crate::threads::rows_per_task(xs.len(), 1);
    crate::threads::parallel_chunks_mut(&mut out, piece, &|i, out| {
        T::narrow(&xs[i * piece..][..out.len()], out);
    });
    out
}

/// Stores the batch's fresh keys and values (`[rows, kv_heads, head_dim]`) in their slots.
pub fn store(kv: &mut KvStorage, layer: usize, seqs: &[SeqSpan<'_>], k: &[f32], v: &[f32]) {
    fn store_in<T: Elem>(
        kv: KvLayout,
        (ck, cv): (&mut [T], &mut [T]),
        seqs: &[SeqSpan<'_>],
        k: &[f32],
        v: &[f32],
    ) {
        let (hd, nkv, bs) = (kv.head_dim, kv.kv_heads, kv.block_size);
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        // A prompt's KV heads over the compute threads: each head's slots lie in its own
        // part of every block (`KvLayout::place`), and a head's rows stay in order (a ring
        // may give two rows of one call the same slot; the later must win).
        let heads_per_task = crate::threads::rows_per_task(nkv, 2 * rows * hd);
        let (lk, lv) = (ck.len(), cv.len());
        let (pk, pv) = (SendPtr(ck.as_mut_ptr()), SendPtr(cv.as_mut_ptr()));
        crate::threads::parallel_for(nkv.div_ceil(heads_per_task), &|task| {
            let mut key = vec![T::default(); hd];
            let heads = task * heads_per_task..((task + 1) * heads_per_task).min(nkv);
            for h in heads {
                for seq in seqs {
                    for i in 0..seq.len {
                        let slot = Ring::slot(kv.ring, seq.start + i);
                        let (base, index) = kv.place(seq.blocks, slot, h);
                        let from = ((seq.row + i) * nkv + h) * hd;
                        assert!(
                            base + (hd - 1) * bs + index < lk && base + (index + 1) * hd <= lv,
                            "a slot inside the cache"
                        );
                        // Keys are stored transposed (a dimension's keys side by side).
                        T::narrow(&k[from..from + hd], &mut key);
                        // SAFETY: inside the arrays (asserted), and in KV head `h`'s part
                        // of the block, which no other task writes; both arrays stay
                        // mutably borrowed until every task has finished.
                        #[allow(unsafe_code)]
                        unsafe {
                            for (d, &x) in key.iter().enumerate() {
                                *pk.get().add(base + d * bs + index) = x;
                            }
                            let value =
                                std::slice::from_raw_parts_mut(pv.get().add(base + index * hd), hd);
                            T::narrow(&v[from..from + hd], value);
                        }
                    }
                }
            }
        });
    }
    let layout = kv.layout_of(layer);
    let seqs = spans_of(kv, layer, seqs);
    match kv.layer_mut(layer) {
        LayerKvMut::F32(ck, cv) => store_in(layout, (ck, cv), &seqs, k, v),
        LayerKvMut::F16(ck, cv) => store_in(layout, (ck, cv), &seqs, k, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv::KvDType;

    /// One sequence's rows fed in `spans` (start, len) of `q, k, v` (all of its rows),
    /// each chunk attended on `isa` and then stored: every row's output, in order.
    #[allow(clippy::too_many_arguments)]
    fn chunks(
        isa: Isa,
        kv: &mut KvStorage,
        blocks: &[u32],
        spans: &[(usize, usize)],
        (q, k, v): (&[f32], &[f32], &[f32]),
        heads: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (hd, nkv) = (kv.layout().head_dim, kv.layout().kv_heads);
        let mut out = vec![];
        for &(start, len) in spans {
            let seq = SeqSpan {
                row: 0,
                len,
                start,
                blocks,
                window_blocks: &[],
            };
            let rows = |x: &[f32], w: usize| x[start * w * hd..(start + len) * w * hd].to_vec();
            let (kk, vv) = (rows(k, nkv), rows(v, nkv));
            let qq = rows(q, heads);
            // Into a buffer that is not empty: what a layer before left must not matter.
            let mut got = vec![f32::NAN; 5];
            attend_on(
                isa,
                kv,
                0,
                &[seq],
                (&qq, &kk, &vv),
                heads,
                scale,
                window,
                &mut got,
            );
            out.extend(got);
            store(kv, 0, &[seq], &kk, &vv);
        }
        out
    }

    fn layout(block_size: usize, kv_heads: usize, head_dim: usize, ring: Option<Ring>) -> KvLayout {
        KvLayout {
            block_size,
            kv_heads,
            head_dim,
            ring,
        }
    }

    /// Plain causal attention over one sequence, `[t, heads, hd]` → `[t, heads * hd]`.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        heads: usize,
        nkv: usize,
        hd: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; t * heads * hd];
        for i in 0..t {
            for h in 0..heads {
                let kh = h / (heads / nkv);
                let qv = &q[(i * heads + h) * hd..][..hd];
                let s: Vec<f32> = (0..=i)
                    .map(|j| {
                        qv.iter()
                            .zip(&k[(j * nkv + kh) * hd..][..hd])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(i * heads + h) * hd + d] += w / z * v[(j * nkv + kh) * hd + d];
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Every score far below zero (e^score underflows f32): the partial softmaxes of a
    /// long prompt's key ranges still merge to the right weights.
    #[test]
    fn very_negative_scores_merge_exactly() {
        let (t, heads, hd) = (300, 2, 8);
        let (q, k) = (vec![-4.0f32; t * heads * hd], vec![3.0f32; t * heads * hd]);
        let v = data(t * heads * hd, 7);
        let want = naive(&q, &k, &v, t, heads, heads, hd);
        let kv =
            KvStorage::new(KvDType::F32, 1, t.div_ceil(16), layout(16, heads, hd, None)).unwrap();
        let blocks: Vec<u32> = (0..t.div_ceil(16) as u32).collect();
        let seq = SeqSpan {
            row: 0,
            len: t,
            start: 0,
            blocks: &blocks,
            window_blocks: &[],
        };
        let mut got = Vec::new();
        attend(&kv, 0, &[seq], (&q, &k, &v), heads, 1.0, None, &mut got);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Attention of `q: [t, heads, hd]` over the positions `visible(i, j)` allows.
    #[allow(clippy::too_many_arguments)]
    fn masked(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        heads: usize,
        nkv: usize,
        hd: usize,
        visible: impl Fn(usize, usize) -> bool,
    ) -> Vec<f32> {
        let mut out = vec![0f32; t * heads * hd];
        for i in 0..t {
            for h in 0..heads {
                let kh = h / (heads / nkv);
                let qv = &q[(i * heads + h) * hd..][..hd];
                let seen: Vec<usize> = (0..=i).filter(|&j| visible(i, j)).collect();
                let s: Vec<f32> = seen
                    .iter()
                    .map(|&j| {
                        let key = &k[(j * nkv + kh) * hd..][..hd];
                        qv.iter().zip(key).map(|(a, b)| a * b).sum()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                for (&j, x) in seen.iter().zip(&s) {
                    let w = (x - m).exp() / z;
                    for d in 0..hd {
                        out[(i * heads + h) * hd + d] += w * v[(j * nkv + kh) * hd + d];
                    }
                }
            }
        }
        out
    }

    /// A ring (first 3 positions kept, 7 more in rotation) under a sliding window of 6, fed
    /// in chunks, some longer than the ring: each query sees exactly the positions both
    /// allow, on every instruction set, in both cache types (f16 against a reference on
    /// keys and values rounded to f16), for head sizes with and without a specialised path
    /// and one that is not a multiple of 4.
    #[test]
    fn ring_and_window_match_masked_attention() {
        let (t, heads, nkv, bs) = (41, 4, 2, 4);
        let (keep, ring_window, window) = (3, 7, 6);
        let ring = Ring {
            keep,
            window: ring_window,
        };
        for (hd, dtype) in [6, 8, 64]
            .into_iter()
            .flat_map(|hd| [(hd, KvDType::F32), (hd, KvDType::F16)])
        {
            let (q, k, v) = (
                data(t * heads * hd, 1),
                data(t * nkv * hd, 2),
                data(t * nkv * hd, 3),
            );
            let stored = |x: &[f32]| -> Vec<f32> {
                match dtype {
                    KvDType::F32 => x.to_vec(),
                    KvDType::F16 => x.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
                    KvDType::BF16 => unreachable!("not a CPU cache type"),
                }
            };
            let want = masked(&q, &stored(&k), &stored(&v), t, heads, nkv, hd, |i, j| {
                i - j < window && (j < keep || i - j < ring_window)
            });
            for &isa in Isa::available() {
                let mut kv = KvStorage::new(dtype, 1, 4, layout(bs, nkv, hd, Some(ring))).unwrap();
                let blocks = [2u32, 0, 3];
                let spans = [
                    (0, 2),
                    (2, 9),
                    (11, 1),
                    (12, 13),
                    (25, 1),
                    (26, 1),
                    (27, 14),
                ];
                let got = chunks(
                    isa,
                    &mut kv,
                    &blocks,
                    &spans,
                    (&q, &k, &v),
                    heads,
                    1.0,
                    Some(window),
                );
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{isa:?} {dtype:?} hd {hd} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A prompt chunk long enough to be scored in blocks of rows (up to 16 threads) gives
    /// each row the bits it gets alone, one decode step at a time (both with and without a
    /// sliding window, keys cached and fresh, f16 and f32 caches).
    #[test]
    fn prompt_blocks_give_the_bits_of_one_row_at_a_time() {
        let (t, bs) = (300, 16);
        for (hd, dtype, window, heads, nkv) in [
            (64, KvDType::F16, None, 4, 2),
            (64, KvDType::F16, Some(40), 9, 3),
            (256, KvDType::F32, None, 4, 1),
            (8, KvDType::F32, Some(7), 10, 2),
        ] {
            let (q, k, v) = (
                data(t * heads * hd, 4),
                data(t * nkv * hd, 5),
                data(t * nkv * hd, 6),
            );
            let blocks: Vec<u32> = (0..t.div_ceil(bs) as u32).rev().collect();
            let run = |spans: &[(usize, usize)]| {
                let mut kv =
                    KvStorage::new(dtype, 1, blocks.len(), layout(bs, nkv, hd, None)).unwrap();
                let qkv = (&q[..], &k[..], &v[..]);
                chunks(
                    Isa::active(),
                    &mut kv,
                    &blocks,
                    spans,
                    qkv,
                    heads,
                    0.125,
                    window,
                )
            };
            let one_by_one: Vec<(usize, usize)> = (0..t).map(|p| (p, 1)).collect();
            assert_eq!(
                run(&[(0, 7), (7, t - 7)]),
                run(&one_by_one),
                "{hd} {window:?}"
            );
        }
    }

    /// Prefill in uneven chunks through scattered blocks equals one causal pass, on every
    /// instruction set.
    #[test]
    fn chunked_paged_attention_matches_causal_attention() {
        // Every head size the kernels specialise for, and some they do not (96: a last
        // partial run of `WEIGHED` dimensions); query heads per KV head from 1 to 9 (the
        // kernels take up to `SCORED` at a time).
        let shapes = [(4, 2), (3, 3), (6, 2), (5, 1), (9, 1)];
        for ((heads, nkv), hd) in shapes
            .into_iter()
            .flat_map(|s| [8, 64, 96, 128, 256].map(|hd| (s, hd)))
        {
            let (t, bs) = (11, 4);
            let (q, k, v) = (
                data(t * heads * hd, 1),
                data(t * nkv * hd, 2),
                data(t * nkv * hd, 3),
            );
            let want = naive(&q, &k, &v, t, heads, nkv, hd);
            for &isa in Isa::available() {
                let mut kv = KvStorage::new(KvDType::F32, 1, 6, layout(bs, nkv, hd, None)).unwrap();
                let blocks = [5u32, 0, 3];
                let spans = [(0, 5), (5, 1), (6, 4), (10, 1)];
                let got = chunks(
                    isa,
                    &mut kv,
                    &blocks,
                    &spans,
                    (&q, &k, &v),
                    heads,
                    1.0,
                    None,
                );
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{isa:?} {heads}/{nkv} heads of {hd}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
