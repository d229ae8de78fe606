//! Paged attention on the CPU: keys and values live in fixed-size blocks, and each sequence
//! reads its own blocks through a block table (vLLM's PagedAttention, Kwon et al. 2023).
//!
//! A forward pass carries the rows of several sequences side by side (each a chunk of its
//! prompt or one decode token). Attention for a query reads the keys already cached for
//! its sequence plus the fresh keys of its own chunk up to itself; the fresh keys are
//! written into the cache afterwards, so a ring (the rotating cache) can never overwrite a
//! key that a query of the same chunk still needs.

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
    let mut out = vec![0f32; row_seq.len() * heads * hd];
    // Tasks of a few (row, head) items; per task, the offsets of the keys a query sees
    // (cached ones first, then fresh ones of its own chunk) and their scores, reused from
    // query to query.
    let items = row_seq.len() * heads;
    let per_task = items
        .div_ceil(4 * crate::threads::num_threads())
        .clamp(1, 16);
    crate::threads::parallel_chunks_mut(&mut out, per_task * hd, &|task, outs| {
        let (mut offsets, mut scores) = (Vec::<usize>::new(), Vec::<f32>::new());
        for (i, out) in outs.chunks_mut(hd).enumerate() {
            let item = task * per_task + i;
            {
                let (row, head) = (item / heads, item % heads);
                let seq = &seqs[row_seq[row]];
                let kv_head = head / groups;
                let qpos = seq.start + (row - seq.row);
                let query = &q[item * hd..(item + 1) * hd];
                let visible = |p: usize| {
                    window.is_none_or(|w| qpos - p < w)
                        && kv.ring.is_none_or(|r| p < r.keep || qpos - p < r.window)
                };
                offsets.clear();
                let cached = |p: usize| kv.row(seq.blocks, p, kv_head);
                match kv.ring {
                    Some(r) => {
                        let recent = seq.start.saturating_sub(r.window).max(r.keep);
                        let positions = (0..r.keep.min(seq.start)).chain(recent..seq.start);
                        offsets.extend(positions.filter(|&p| visible(p)).map(cached));
                    }
                    None => {
                        let first = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
                        let positions = first.min(seq.start)..seq.start;
                        offsets.extend(positions.filter(|&p| visible(p)).map(cached));
                    }
                }
                let in_cache = offsets.len();
                offsets.extend(
                    (seq.start..=qpos)
                        .filter(|&p| visible(p))
                        .map(|p| ((seq.row + p - seq.start) * nkv + kv_head) * hd),
                );
                let (old, new) = offsets.split_at(in_cache);
                scores.clear();
                scores.extend(
                    old.iter()
                        .map(|&at| dot(query, &cache_k[at..at + hd]) * scale),
                );
                scores.extend(new.iter().map(|&at| dot(query, &k[at..at + hd]) * scale));
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let (p_old, p_new) = scores.split_at(in_cache);
                let values = old
                    .iter()
                    .zip(p_old)
                    .map(|(&at, p)| (&cache_v[at..at + hd], p))
                    .chain(new.iter().zip(p_new).map(|(&at, p)| (&v[at..at + hd], p)));
                for (value, &p) in values {
                    let w = p / sum;
                    for (o, x) in out.iter_mut().zip(value) {
                        *o += w * x;
                    }
                }
            }
        }
    });
    out
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
