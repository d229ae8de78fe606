//! The decoder's device seam: every operation its forward pass performs, over activation
//! buffers the backend owns. [`crate::model::decoder`] writes the pass once against
//! [`Ops`]; [`Cpu`] runs it on host `Vec<f32>`s with Cortex's own kernels (the quantized
//! products, the paged attention) and candle's CPU ones. A GPU backend implements the same
//! operations over device buffers (`crate::cuda::Pass`), so the model, the engine and the
//! API stay one.
//!
//! Buffers are row-major f32, `[rows, width]`; an operation that writes a buffer sizes it.

use candle_core::{Device, Tensor};

use crate::engine::kv::KvStorage;
use crate::error::Result;
use crate::model::attention::{self, SeqSpan};
use crate::model::config::Activation;
use crate::model::decoder::{Draw, Logits};
use crate::model::layers::{Embedding, Linear, MoeMlp, Norm, Rope};
use crate::model::profile::timed;
use crate::quant::kernels::QuantizedRows;

pub trait Ops {
    /// `[rows, width]` f32 activations.
    type Buf: Default + Send;
    /// What the linear layers compute in besides their inputs and outputs.
    type Scratch: Default + Send;

    /// `out: [ids, width]` ← the embedding rows of `ids`.
    fn embed(
        &self,
        table: &Embedding,
        ids: &[u32],
        width: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `x += a`, or `x += a + b` (a parallel block's two branches).
    fn add(&self, x: &mut Self::Buf, a: &Self::Buf, b: Option<&Self::Buf>) -> Result<()>;
    fn scale(&self, x: &mut Self::Buf, factor: f32) -> Result<()>;
    /// Each `[.., d]` row of `x` normalised in place.
    fn norm(&self, norm: &Norm, x: &mut Self::Buf) -> Result<()>;
    /// `out ← norm(x)`, `x` unchanged (a layer's input norm). `out` is the next linear
    /// layers' input: the backend may prepare it for them in `scratch` (the GPU rounds it
    /// to q8 in the same kernel).
    fn norm_into(
        &self,
        norm: &Norm,
        x: &Self::Buf,
        out: &mut Self::Buf,
        scratch: &mut Self::Scratch,
    ) -> Result<()>;
    /// `x += a (+ b)`, then `out ← norm(x)`: a residual add and the norm that reads it
    /// (one kernel on the GPU); `out` as in [`Ops::norm_into`].
    fn add_norm(
        &self,
        x: &mut Self::Buf,
        (a, b): (&Self::Buf, Option<&Self::Buf>),
        norm: &Norm,
        out: &mut Self::Buf,
        scratch: &mut Self::Scratch,
    ) -> Result<()> {
        self.add(x, a, b)?;
        self.norm_into(norm, x, out, scratch)
    }
    /// `x: [rows, in]` through each layer into its `outs[i]: [rows, out_i]`: the
    /// projections of one input (q/k/v, gate/up) go together.
    fn linear<const N: usize>(
        &self,
        layers: [&Linear; N],
        x: &Self::Buf,
        rows: usize,
        outs: [&mut Self::Buf; N],
        scratch: &mut Self::Scratch,
    ) -> Result<()>;
    /// RoPE on the queries `q: [rows, heads, head_dim]` and the keys
    /// `k: [rows, kv_heads, head_dim]` (`positions[r]` is row `r`'s position), then
    /// `out: [rows, heads * head_dim]` ← attention of the rows' queries over each
    /// sequence's cached keys and values and the rows' own `k`, `v`; `k`, `v` are written
    /// into the cache (on the GPU by the RoPE kernel, where that is safe). `scratch` holds
    /// what the backend computes in besides (the GPU's partial results when it splits long
    /// rows).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        kv: &mut KvStorage,
        layer: usize,
        seqs: &[SeqSpan<'_>],
        rope: (&Rope, &[usize]),
        qkv: (&mut Self::Buf, &mut Self::Buf, &Self::Buf),
        heads: usize,
        scale: f32,
        window: Option<usize>,
        out: &mut Self::Buf,
        scratch: &mut Self::Scratch,
    ) -> Result<()>;
    /// `gate ← act(gate) · up`, the down projection's input (prepared in `scratch` as
    /// [`Ops::norm_into`] prepares its output).
    fn gated(
        &self,
        act: Activation,
        gate: &mut Self::Buf,
        up: &Self::Buf,
        scratch: &mut Self::Scratch,
    ) -> Result<()>;
    /// `x ← act(x)`.
    fn activation(&self, act: Activation, x: &mut Self::Buf) -> Result<()>;
    /// A mixture of experts, `x: [rows, d]` → `out: [rows, d]`.
    fn moe(&self, moe: &MoeMlp, x: &Self::Buf, rows: usize, out: &mut Self::Buf) -> Result<()>;
    /// `out: [rows.len(), width]` ← the listed rows of `x`.
    fn gather_rows(
        &self,
        x: &Self::Buf,
        rows: &[u32],
        width: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `x: [rows, width]` on the host (the logits the sampler reads); given `draws`, a
    /// backend whose copies are dear may draw each row's token itself and return those.
    fn to_host(
        &self,
        x: Self::Buf,
        rows: usize,
        width: usize,
        draws: Option<&[Draw]>,
    ) -> Result<Logits>;
}

/// The CPU: host buffers, Cortex's kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Ops for Cpu {
    type Buf = Vec<f32>;
    /// The activations of the last product, rounded to int8 for the quantized kernels.
    type Scratch = QuantizedRows;

    fn embed(
        &self,
        table: &Embedding,
        ids: &[u32],
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        timed("embedding", || {
            out.resize(ids.len() * width, 0.0);
            table.forward_into(ids, out)
        })
    }

    fn norm_into(
        &self,
        norm: &Norm,
        x: &Vec<f32>,
        out: &mut Vec<f32>,
        _scratch: &mut QuantizedRows,
    ) -> Result<()> {
        timed("norm", || {
            norm.apply_into(x, out);
            Ok(())
        })
    }

    fn add(&self, x: &mut Vec<f32>, a: &Vec<f32>, b: Option<&Vec<f32>>) -> Result<()> {
        timed("elementwise", || {
            // Over the compute threads, as a prompt's residuals are 512 × d and more.
            let piece = crate::threads::rows_per_task(x.len(), 1);
            crate::threads::parallel_chunks_mut(x, piece, &|i, x| {
                let a = &a[i * piece..][..x.len()];
                match b {
                    None => x.iter_mut().zip(a).for_each(|(x, a)| *x += a),
                    Some(b) => {
                        let b = &b[i * piece..][..x.len()];
                        for ((x, a), b) in x.iter_mut().zip(a).zip(b) {
                            *x += a + b;
                        }
                    }
                }
            });
            Ok(())
        })
    }

    fn scale(&self, x: &mut Vec<f32>, factor: f32) -> Result<()> {
        timed("elementwise", || {
            crate::model::math::zip_in_place(x, None, |x, _| x * factor);
            Ok(())
        })
    }

    fn norm(&self, norm: &Norm, x: &mut Vec<f32>) -> Result<()> {
        timed("norm", || {
            norm.apply(x);
            Ok(())
        })
    }

    fn linear<const N: usize>(
        &self,
        layers: [&Linear; N],
        x: &Vec<f32>,
        rows: usize,
        outs: [&mut Vec<f32>; N],
        scratch: &mut QuantizedRows,
    ) -> Result<()> {
        timed("linear", || {
            Linear::forward_rows(layers, x, rows, outs, scratch)
        })
    }

    fn attention(
        &self,
        kv: &mut KvStorage,
        layer: usize,
        seqs: &[SeqSpan<'_>],
        (rope, positions): (&Rope, &[usize]),
        (q, k, v): (&mut Vec<f32>, &mut Vec<f32>, &Vec<f32>),
        heads: usize,
        scale: f32,
        window: Option<usize>,
        out: &mut Vec<f32>,
        _scratch: &mut QuantizedRows,
    ) -> Result<()> {
        if kv.is_on_gpu() {
            return Err(crate::Error::Internal(
                "a GPU KV cache in a CPU forward pass".into(),
            ));
        }
        timed("rope", || {
            rope.rotate((q, k), kv.layout().head_dim, positions);
            Ok(())
        })?;
        timed("attention", || {
            attention::attend(kv, layer, seqs, (q, k, v), heads, scale, window, out);
            Ok(())
        })?;
        timed("kv store", || {
            attention::store(kv, layer, seqs, k, v);
            Ok(())
        })
    }

    fn gated(
        &self,
        act: Activation,
        gate: &mut Vec<f32>,
        up: &Vec<f32>,
        _scratch: &mut QuantizedRows,
    ) -> Result<()> {
        timed("activation", || {
            act.gated(gate, up);
            Ok(())
        })
    }

    fn activation(&self, act: Activation, x: &mut Vec<f32>) -> Result<()> {
        timed("activation", || {
            act.apply(x);
            Ok(())
        })
    }

    fn moe(&self, moe: &MoeMlp, x: &Vec<f32>, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        timed("moe routing and experts", || {
            let xs = Tensor::from_slice(x, (1, rows, x.len() / rows.max(1)), &Device::Cpu)?;
            let y = moe.forward(&xs)?;
            *out = y.flatten_all()?.to_vec1::<f32>()?;
            Ok(())
        })
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        rows: &[u32],
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        for &r in rows {
            out.extend_from_slice(&x[r as usize * width..][..width]);
        }
        Ok(())
    }

    /// The logits are on the host already: the sampler draws from them.
    fn to_host(
        &self,
        x: Vec<f32>,
        rows: usize,
        width: usize,
        _: Option<&[Draw]>,
    ) -> Result<Logits> {
        Logits::new(x, rows, width)
    }
}
