//! Paged attention on the CPU: keys and values live in fixed-size blocks, and each sequence
//! reads its own blocks through a block table (vLLM's PagedAttention, Kwon et al. 2023).
//!
//! A forward pass carries the rows of several sequences side by side (each a chunk of its
//! prompt or one decode token). Attention for a query reads the keys already cached for
//! its sequence plus the fresh keys of its own chunk up to itself; the fresh keys are
//! written into the cache afterwards, so a ring (the rotating cache) can never overwrite a
//! key that a query of the same chunk still needs.

use std::ops::Range;

use crate::error::{Error, Result};

/// The rotating cache's shape (mlx-lm's `RotatingKVCache`): the first `keep` positions
/// stay, and the rest share `window` slots in a ring, so a sequence holds at most
/// `keep + window` positions and sees its first tokens and the most recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    pub keep: usize,
    pub window: usize,
}

impl Ring {
    /// Cache slots a sequence of `len` positions occupies.
    pub fn slots(ring: Option<Ring>, len: usize) -> usize {
        ring.map_or(len, |r| len.min(r.keep + r.window))
    }

    /// The slot of position `p` within its sequence.
    fn slot(ring: Option<Ring>, p: usize) -> usize {
        match ring {
            Some(r) if p >= r.keep => r.keep + (p - r.keep) % r.window,
            _ => p,
        }
    }
}

/// Keys and values of every layer: `[num_blocks, kv_heads, block_size, head_dim]` f32 each
/// (a head's keys in a block are contiguous: a query streams through them).
/// Buffers are zero-initialised allocations, which the OS maps lazily: memory is resident
/// only for blocks that have been written, though the whole pool is reserved up front.
#[derive(Debug)]
pub struct KvStorage {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub ring: Option<Ring>,
}

impl KvStorage {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        ring: Option<Ring>,
    ) -> Result<Self> {
        let len = num_blocks
            .checked_mul(block_size * kv_heads * head_dim)
            .ok_or_else(|| Error::param("kv_cache_tokens", "the KV cache size overflows"))?;
        Ok(KvStorage {
            layers: (0..num_layers)
                .map(|_| (vec![0f32; len], vec![0f32; len]))
                .collect(),
            block_size,
            kv_heads,
            head_dim,
            num_blocks,
            ring,
        })
    }

    /// Bytes of K and V per cached token, over all layers.
    pub fn bytes_per_token(num_layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Adds `more` blocks (a single sequence's cache growing).
    pub fn grow(&mut self, more: usize) {
        self.num_blocks += more;
        let len = self.num_blocks * self.block_size * self.kv_heads * self.head_dim;
        for (k, v) in &mut self.layers {
            k.resize(len, 0.0);
            v.resize(len, 0.0);
        }
    }

    fn row(&self, blocks: &[u32], p: usize, kv_head: usize) -> usize {
        let slot = Ring::slot(self.ring, p);
        let block = blocks[slot / self.block_size] as usize;
        ((block * self.kv_heads + kv_head) * self.block_size + slot % self.block_size)
            * self.head_dim
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
/// a row's result does not depend on what else is in the batch.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    kv: &KvStorage,
    layer: usize,
    seqs: &[SeqSpan<'_>],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let (hd, nkv) = (kv.head_dim, kv.kv_heads);
    let groups = heads / nkv;
    let (cache_k, cache_v) = &kv.layers[layer];
    // Which sequence each row belongs to.
    let row_seq: Vec<usize> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| std::iter::repeat_n(i, s.len))
        .collect();
    let rows = row_seq.len();
    let units = rows * nkv;
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
    let splits = (0..rows)
        .map(|row| {
            let seq = &seqs[row_seq[row]];
            splits_of(seq.start + (row - seq.row) + 1)
        })
        .max()
        .unwrap_or(1);
    // Per task and query head: [max score, sum of weights, Σ weight·value (head_dim)].
    let part = 2 + hd;
    let mut partial = vec![0f32; units * splits * groups * part];
    // A task takes one split when there are few rows (decoding: the splits are the
    // parallelism) and all of a (row, KV head)'s otherwise; either way each split's
    // arithmetic is the same.
    let per_task = if units >= 4 * crate::threads::num_threads() {
        splits
    } else {
        1
    };
    crate::threads::parallel_chunks_mut(
        &mut partial,
        per_task * groups * part,
        &|task, partials| {
            let (mut cached, mut fresh, mut scores) = (Vec::new(), Vec::new(), Vec::new());
            for (i, partial) in partials.chunks_mut(groups * part).enumerate() {
                let (unit, split) = (
                    (task * per_task + i) / splits,
                    (task * per_task + i) % splits,
                );
                let (row, kv_head) = (unit / nkv, unit % nkv);
                let seq = &seqs[row_seq[row]];
                let [kept, recent] = positions(row);
                let n = kept.len() + recent.len();
                if split >= splits_of(n) {
                    // Nothing for this split: an empty partial softmax.
                    partial.fill(0.0);
                    continue;
                }
                // This split's keys: cached ones first, then fresh ones of the row's own chunk.
                let (lo, hi) = (split * n / splits_of(n), (split + 1) * n / splits_of(n));
                let position = |i: usize| match kept.len() {
                    k if i < k => kept.start + i,
                    k => recent.start + i - k,
                };
                cached.clear();
                fresh.clear();
                for p in (lo..hi).map(position) {
                    if p < seq.start {
                        cached.push(kv.row(seq.blocks, p, kv_head));
                    } else {
                        fresh.push(((seq.row + p - seq.start) * nkv + kv_head) * hd);
                    }
                }
                let ranges = [cached.as_slice(), fresh.as_slice()];
                let sources = [(cache_k.as_slice(), cache_v.as_slice()), (k, v)];
                for (h, partial) in partial.chunks_mut(part).enumerate() {
                    let query = &q[((row * heads) + kv_head * groups + h) * hd..][..hd];
                    match hd {
                        64 => weigh::<64>(query, ranges, sources, scale, &mut scores, partial),
                        128 => weigh::<128>(query, ranges, sources, scale, &mut scores, partial),
                        _ => weigh::<0>(query, ranges, sources, scale, &mut scores, partial),
                    }
                }
            }
        },
    );
    // Merge the splits of each (row, head): rescale each to the largest maximum.
    let mut out = vec![0f32; rows * heads * hd];
    for (i, out) in out.chunks_mut(hd).enumerate() {
        let (row, head) = (i / heads, i % heads);
        let (unit, h) = (row * nkv + head / groups, head % groups);
        // Splits with keys (a row always sees itself, so at least one).
        let parts: Vec<&[f32]> = (0..splits)
            .map(|s| &partial[((unit * splits + s) * groups + h) * part..][..part])
            .filter(|p| p[1] > 0.0)
            .collect();
        let max = parts.iter().map(|p| p[0]).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for p in &parts {
            let w = (p[0] - max).exp();
            sum += w * p[1];
            for (o, x) in out.iter_mut().zip(&p[2..]) {
                *o += w * x;
            }
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
    out
}

/// Keys per attention task (while there are at most `MAX_SPLITS` tasks per row and KV head).
const KEYS_PER_TASK: usize = 32;
const MAX_SPLITS: usize = 8;

/// One query head's partial attention over the keys at `offsets[0]` in `sources[0]` (the
/// cache) and `offsets[1]` in `sources[1]` (the fresh rows): writes `[max, Σ w, Σ w·v]`
/// to `out` with `w = exp(scale · q·k − max)` (`Σ w = 0` when there are no keys). `HD` is
/// the head size when it is known at compile time (0: `query.len()`): fixed lengths let the
/// loops unroll and the sums stay in registers while the values stream past.
#[inline(always)]
fn weigh<const HD: usize>(
    query: &[f32],
    offsets: [&[usize]; 2],
    sources: [(&[f32], &[f32]); 2],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = if HD == 0 { query.len() } else { HD };
    let query = &query[..hd];
    scores.clear();
    for (offsets, (keys, _)) in offsets.iter().zip(sources) {
        scores.extend(
            offsets
                .iter()
                .map(|&at| dot(query, &keys[at..at + hd]) * scale),
        );
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scores.iter_mut().for_each(|s| *s = exp(*s - max));
    let sum: f32 = scores.iter().sum();
    let (head, acc_out) = out.split_at_mut(2);
    head[0] = max;
    head[1] = sum;
    let mut weights = scores.iter();
    if HD == 0 {
        acc_out.fill(0.0);
        for (offsets, (_, values)) in offsets.iter().zip(sources) {
            for (&at, &p) in offsets.iter().zip(&mut weights) {
                for (o, x) in acc_out.iter_mut().zip(&values[at..at + hd]) {
                    *o += p * x;
                }
            }
        }
    } else {
        let mut acc = [0f32; HD];
        for (offsets, (_, values)) in offsets.iter().zip(sources) {
            for (&at, &p) in offsets.iter().zip(&mut weights) {
                for (a, x) in acc.iter_mut().zip(&values[at..at + HD]) {
                    *a += p * x;
                }
            }
        }
        acc_out.copy_from_slice(&acc);
    }
}

/// Stores the batch's fresh keys and values (`[rows, kv_heads, head_dim]`) in their slots.
pub fn store(kv: &mut KvStorage, layer: usize, seqs: &[SeqSpan<'_>], k: &[f32], v: &[f32]) {
    let (hd, nkv) = (kv.head_dim, kv.kv_heads);
    for seq in seqs {
        for i in 0..seq.len {
            for h in 0..nkv {
                let at = kv.row(seq.blocks, seq.start + i, h);
                let from = ((seq.row + i) * nkv + h) * hd;
                let (ck, cv) = &mut kv.layers[layer];
                ck[at..at + hd].copy_from_slice(&k[from..from + hd]);
                cv[at..at + hd].copy_from_slice(&v[from..from + hd]);
            }
        }
    }
}

/// `e^x` for `x ≤ 0` (softmax weights) within 5e-7 relative of `f32::exp`, in plain
/// arithmetic so that a loop over scores vectorises (libm's `expf` is a call per score):
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its Taylor series to `r⁷` (truncation
/// below 2e-7 relative), times `2^n` built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // ln of the smallest normal f32: below it 2^n would not be a normal number.
    let x = x.max(-87.336_55);
    // Round to nearest by adding 1.5·2^23 (exact for |x·log2 e| < 2^22).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `a · b` with four independent 8-lane sums, so that it vectorises and consecutive
/// fused multiply-adds do not wait on each other (one running sum would be sequential).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    let (wide_a, wide_b) = (a.chunks_exact(32), b.chunks_exact(32));
    let (rest_a, rest_b) = (wide_a.remainder(), wide_b.remainder());
    for (x, y) in wide_a.zip(wide_b) {
        for (c, acc) in acc.iter_mut().enumerate() {
            for (l, acc) in acc.iter_mut().enumerate() {
                *acc += x[8 * c + l] * y[8 * c + l];
            }
        }
    }
    let (eights_a, eights_b) = (rest_a.chunks_exact(8), rest_b.chunks_exact(8));
    let tail: f32 = eights_a
        .remainder()
        .iter()
        .zip(eights_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in eights_a.zip(eights_b) {
        for (l, acc) in acc[0].iter_mut().enumerate() {
            *acc += x[l] * y[l];
        }
    }
    let mut sum = [0f32; 8];
    for acc in &acc {
        for (s, a) in sum.iter_mut().zip(acc) {
            *s += a;
        }
    }
    sum.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .map(|i| (((i as u32 * 2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp(x), x.exp());
            if std > f32::MIN_POSITIVE {
                worst = worst.max(((ours - std) / std).abs());
            } else {
                assert!(ours < 1e-37, "{x}: {ours}");
            }
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.336_55));
    }

    /// Every score far below zero (e^score underflows f32): the partial softmaxes of a
    /// long prompt's key ranges still merge to the right weights.
    #[test]
    fn very_negative_scores_merge_exactly() {
        let (t, heads, hd) = (300, 2, 8);
        let (q, k) = (vec![-4.0f32; t * heads * hd], vec![3.0f32; t * heads * hd]);
        let v = data(t * heads * hd, 7);
        let want = naive(&q, &k, &v, t, heads, heads, hd);
        let kv = KvStorage::new(1, t.div_ceil(16), 16, heads, hd, None).unwrap();
        let blocks: Vec<u32> = (0..t.div_ceil(16) as u32).collect();
        let seq = SeqSpan {
            row: 0,
            len: t,
            start: 0,
            blocks: &blocks,
        };
        let got = attend(&kv, 0, &[seq], &q, &k, &v, heads, 1.0, None);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Prefill in uneven chunks through scattered blocks equals one causal pass.
    #[test]
    fn chunked_paged_attention_matches_causal_attention() {
        let (t, heads, nkv, hd, bs) = (11, 4, 2, 8, 4);
        let (q, k, v) = (
            data(t * heads * hd, 1),
            data(t * nkv * hd, 2),
            data(t * nkv * hd, 3),
        );
        let want = naive(&q, &k, &v, t, heads, nkv, hd);
        let mut kv = KvStorage::new(1, 6, bs, nkv, hd, None).unwrap();
        let blocks = [5u32, 0, 3];
        let mut got = vec![];
        for (start, len) in [(0, 5), (5, 1), (6, 4), (10, 1)] {
            let seq = SeqSpan {
                row: 0,
                len,
                start,
                blocks: &blocks,
            };
            let rows = |x: &[f32], w: usize| x[start * w * hd..(start + len) * w * hd].to_vec();
            let (kk, vv) = (rows(&k, nkv), rows(&v, nkv));
            got.extend(attend(
                &kv,
                0,
                &[seq],
                &rows(&q, heads),
                &kk,
                &vv,
                heads,
                1.0,
                None,
            ));
            store(&mut kv, 0, &[seq], &kk, &vv);
        }
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
