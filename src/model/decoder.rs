//! The one decoder: a pre-norm transformer over a per-sequence KV cache — GQA attention with
//! RoPE, a gated MLP, RMSNorm — with the switches each family needs (q/k norms, sandwich
//! norms, embedding scale, sliding-window layers; see `ModelConfig`). Follows HF
//! transformers' `modeling_llama.py` / `modeling_gemma3.py` and llama.cpp's
//! `llm_build_llama` / `llm_build_gemma3`; candle-transformers' `quantized_llama.rs` serves
//! as an independent oracle in `tests/oracle_llama.rs`.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::layers::{Embedding, FeedForward, Linear, Norm, Rope};

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm of q and k, before RoPE (Gemma 3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k.
    pub scale: f64,
    /// A local layer: attends to the last `sliding_window` positions, with the local RoPE.
    pub local: bool,
}

/// One layer. Norm names follow HF Gemma 3; in the llama family only `input_layernorm` and
/// `pre_feedforward_layernorm` (HF llama's `post_attention_layernorm`) exist.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Norm,
    pub self_attn: Attention,
    /// Applied to the attention output before the residual add (sandwich norms).
    pub post_attention_layernorm: Option<Norm>,
    /// `None` in Phi's parallel block: the MLP reads the attention's (normalised) input and
    /// both outputs join the residual together.
    pub pre_feedforward_layernorm: Option<Norm>,
    pub mlp: FeedForward,
    /// Applied to the MLP output before the residual add (sandwich norms).
    pub post_feedforward_layernorm: Option<Norm>,
}

#[derive(Debug)]
pub struct Decoder {
    /// `[vocab, d]`, kept in its stored form; rows are dequantized on lookup.
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: Norm,
    /// `[vocab, d]`; shares `embed_tokens` when the embeddings are tied.
    pub lm_head: Linear,
    /// RoPE of global layers, and of local (sliding-window) layers where they differ.
    pub rope: Rope,
    pub local_rope: Option<Rope>,
    pub config: ModelConfig,
    pub device: Device,
}

/// Keys and values of one layer: `[1, kv_heads, capacity, head_dim]` buffers of which the
/// first `KvCache::len` positions are filled. Capacity doubles as needed, so a sequence
/// costs memory for its own length, not the model's whole context.
#[derive(Debug)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Capacity never grows past the model's context length.
    max_len: usize,
}

/// The KV cache of one sequence.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        KvCache {
            layers: (0..num_layers)
                .map(|_| LayerKv {
                    k: None,
                    v: None,
                    max_len,
                })
                .collect(),
            len: 0,
            max_len,
        }
    }

    /// Number of positions already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl LayerKv {
    /// Appends `k, v: [1, kv_heads, t, head_dim]` at position `len` and returns views of
    /// all `len + t` positions.
    fn append(&mut self, k: &Tensor, v: &Tensor, len: usize) -> Result<(Tensor, Tensor)> {
        let (_, kv_heads, t, head_dim) = k.dims4()?;
        let need = len + t;
        let capacity = self.k.as_ref().map_or(0, |b| b.dims()[2]);
        if need > capacity {
            let new_capacity = need
                .max((2 * capacity).min(self.max_len))
                .max(64.min(self.max_len));
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf =
                    Tensor::zeros((1, kv_heads, new_capacity, head_dim), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if len > 0 {
                        buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => {
                return Err(Error::Engine(
                    "KV cache buffers missing after growth".into(),
                ))
            }
        };
        kb.slice_set(&k.contiguous()?, 2, len)?;
        vb.slice_set(&v.contiguous()?, 2, len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}

impl Attention {
    /// `xs: [1, t, d]` at positions `pos..pos + t` → `[1, t, d]`.
    fn forward(&self, xs: &Tensor, step: &Step<'_>, kv: &mut LayerKv) -> Result<Tensor> {
        let (rope, cos, sin, mask) = step.for_layer(self.local);
        let pos = step.pos;
        let (b, t, _) = xs.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(xs)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?; // [1, nh, t, hd]
        let k = self
            .k_proj
            .forward(xs)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // [1, nkv, t, hd]
        let v = self
            .v_proj
            .forward(xs)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // [1, nkv, t, hd]
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q.contiguous()?)?, kn.forward(&k.contiguous()?)?),
            _ => (q, k),
        };
        let q = rope.apply(&q, cos, sin)?;
        let k = rope.apply(&k, cos, sin)?;
        let (k, v) = kv.append(&k, &v, pos)?; // [1, nkv, T, hd], T = pos + t
        let total = pos + t;

        // Grouped-query attention without copying K/V: query head h reads KV head
        // h / groups (HF `repeat_kv`), and heads are stored KV-major, so folding the group
        // into the row dimension lines each query up with its KV head.
        let groups = nh / nkv;
        let q = q.reshape((b, nkv, groups * t, hd))?;
        let att = (q.matmul(&k.t()?)? * self.scale)?; // [1, nkv, groups * t, T]
        let att = match mask {
            Some(mask) => att
                .reshape((b, nkv, groups, t, total))?
                .broadcast_add(mask)?
                .reshape((b, nkv, groups * t, total))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?; // [1, nkv, groups * t, hd]
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o_proj.forward(&y)
    }
}

/// What every layer of one forward pass shares: positions, RoPE tables and masks (for
/// global layers, and for local ones when the model has them).
struct Step<'a> {
    pos: usize,
    rope: &'a Rope,
    cos: Tensor, // [t, head_dim / 2]
    sin: Tensor,
    mask: Option<Tensor>, // [t, pos + t]
    local: Option<(&'a Rope, Tensor, Tensor, Option<Tensor>)>,
}

impl Step<'_> {
    fn for_layer(&self, local: bool) -> (&Rope, &Tensor, &Tensor, Option<&Tensor>) {
        match (&self.local, local) {
            (Some((rope, cos, sin, mask)), true) => (rope, cos, sin, mask.as_ref()),
            _ => (self.rope, &self.cos, &self.sin, self.mask.as_ref()),
        }
    }
}

/// Additive mask `[t, pos + t]`: query `i` (at position `pos + i`) sees keys `0..=pos + i`,
/// and with a `window` only the last `window` of those (HF `sliding_window`); `None` when
/// nothing is masked (one query over a short enough history).
fn attention_mask(
    t: usize,
    pos: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = pos + t;
    let hidden = |i: usize, j: usize| j > pos + i || window.is_some_and(|w| pos + i - j >= w);
    if !(0..t).any(|i| (0..total).any(|j| hidden(i, j))) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, total), device)?))
}

impl Decoder {
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.config.max_position_embeddings)
    }

    /// Runs `tokens` (at positions `cache.len()..`) through the model, appending their keys
    /// and values to `cache`. Returns logits `[t, vocab]` when `all_positions`, else `[1, vocab]`
    /// for the last token.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            return Err(Error::param("token_ids", "at least one token is required"));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::param(
                "token_ids",
                format!("token id {bad} is out of vocabulary (size {vocab})"),
            ));
        }
        let pos = cache.len;
        if pos + t > cache.max_len {
            return Err(Error::ContextLength {
                prompt_tokens: pos + t,
                context_length: cache.max_len,
            });
        }
        let mut x = self
            .embed_tokens
            .forward(tokens, &self.device)?
            .unsqueeze(0)?; // [1, t, d]
        if self.config.scale_embeddings {
            // Gemma: HF computes the factor in the activation dtype, f32 here.
            x = (x * f64::from((self.config.hidden_size as f32).sqrt()))?;
        }
        let (cos, sin) = self.rope.tables(pos, t, &self.device)?;
        let local = match (&self.local_rope, self.config.sliding_window) {
            (Some(rope), Some(window)) => {
                let (cos, sin) = rope.tables(pos, t, &self.device)?;
                Some((
                    rope,
                    cos,
                    sin,
                    attention_mask(t, pos, Some(window), &self.device)?,
                ))
            }
            _ => None,
        };
        let step = Step {
            pos,
            rope: &self.rope,
            cos,
            sin,
            mask: attention_mask(t, pos, None, &self.device)?,
            local,
        };
        for (block, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let normed = block.input_layernorm.forward(&x)?;
            let mut h = block.self_attn.forward(&normed, &step, kv)?;
            if let Some(norm) = &block.post_attention_layernorm {
                h = norm.forward(&h)?;
            }
            let Some(pre_mlp) = &block.pre_feedforward_layernorm else {
                x = ((x + h)? + block.mlp.forward(&normed)?)?;
                continue;
            };
            x = (x + h)?;
            let mut h = block.mlp.forward(&pre_mlp.forward(&x)?)?;
            if let Some(norm) = &block.post_feedforward_layernorm {
                h = norm.forward(&h)?;
            }
            x = (x + h)?;
        }
        cache.len = pos + t;
        let x = if all_positions {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?)
    }
}
