//! Building blocks of the decoder: linear layers over quantized weights, RMSNorm, rotary
//! position embeddings and the SwiGLU MLP. Shapes use `t` for tokens in a step and `d`
//! for hidden size.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::model::config::Activation;
use crate::quant::kernels::QuantizedRows;
use crate::quant::{ggml, AffineMatrix, Isa, PackedMatrix, ScaleDType};

/// How a weight matrix `[out, in]` is stored in memory: affine groups in our kernels'
/// layout (MLX folders, and the GGML types that are affine: Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0), other GGML blocks (k-quants, run by candle), or dense f32 (float safetensors).
/// Quantized weights stay quantized; nothing is expanded to f32 at load.
#[derive(Debug, Clone)]
pub enum Weight {
    Ggml(Arc<QTensor>),
    Dense(Tensor),
    Packed(Arc<PackedMatrix>),
}

impl Weight {
    /// GGML blocks as read from a GGUF file: repacked for our kernels when the type is
    /// affine (exactly, see `quant::ggml`), kept for candle's otherwise.
    pub fn from_ggml(q: Arc<QTensor>) -> Result<Weight> {
        let (rows, cols) = q.shape().dims2()?;
        Ok(match ggml::to_affine(q.dtype(), &q.data()?, rows, cols)? {
            Some(a) => Weight::Packed(Arc::new(PackedMatrix::from_affine(&a))),
            None => Weight::Ggml(q),
        })
    }

    /// MLX affine groups, repacked for our kernels.
    pub fn from_affine(a: &AffineMatrix) -> Weight {
        Weight::Packed(Arc::new(PackedMatrix::from_affine(a)))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Ggml(q) => {
                let d = q.shape().dims();
                (d[0], d[d.len() - 1])
            }
            Weight::Dense(t) => {
                let d = t.dims();
                (d[0], d[d.len() - 1])
            }
            Weight::Packed(p) => (p.rows, p.cols),
        }
    }

    /// Rows `start..start + len` (a part of a fused projection), in the same storage form.
    pub fn rows(&self, start: usize, len: usize) -> Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.narrow(0, start, len)?.contiguous()?),
            Weight::Ggml(q) => {
                let (_, cols) = self.dims();
                let dtype = q.dtype();
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let part = &data[start * row_bytes..(start + len) * row_bytes];
                Weight::Ggml(Arc::new(
                    candle_core::quantized::ggml_file::qtensor_from_ggml(
                        dtype,
                        part,
                        vec![len, cols],
                        &q.device(),
                    )?,
                ))
            }
            Weight::Packed(p) => Weight::Packed(Arc::new(p.rows(start, len)?)),
        })
    }

    /// Bytes the weight occupies in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            Weight::Ggml(q) => q.storage_size_in_bytes(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Packed(p) => p.nbytes(),
        }
    }
}

/// A linear layer, `[.., in]` → `[.., out]`, with an optional bias `[out]` (f32).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// GGML blocks or a dense matrix, through candle's `QMatMul`.
    Candle(QMatMul),
    /// Affine groups, through our kernels (`quant::kernels`).
    Packed(Arc<PackedMatrix>),
}

impl Linear {
    pub fn new(weight: Weight) -> Result<Self> {
        let weight = match weight {
            Weight::Ggml(q) => LinearWeight::Candle(QMatMul::from_arc(q)?),
            Weight::Dense(t) => LinearWeight::Candle(QMatMul::Tensor(t)),
            Weight::Packed(p) => LinearWeight::Packed(p),
        };
        Ok(Linear { weight, bias: None })
    }

    pub fn with_bias(self, bias: Option<Tensor>) -> Self {
        Linear { bias, ..self }
    }

    /// Whether the weight holds float values (not quantized blocks).
    pub fn is_float(&self) -> bool {
        matches!(
            &self.weight,
            LinearWeight::Candle(QMatMul::Tensor(_) | QMatMul::TensorF16(_))
        )
    }

    /// Bytes of the weight in memory.
    pub fn nbytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            LinearWeight::Packed(p) => p.nbytes(),
        }
    }

    /// The same layer with its weight requantized to MLX affine groups of `bits` (the bias
    /// is kept): the matrix is expanded one layer at a time and packed again, except affine
    /// weights of that width already (GGML's Q4_0/Q4_1 at 4 bits, say), which stay exactly
    /// as they are. A matrix whose width no group size divides stays as it is too.
    pub fn requantized(&self, bits: u32, group_size: usize) -> Result<Linear> {
        if matches!(&self.weight, LinearWeight::Packed(p) if p.bits == bits) {
            return Ok(self.clone());
        }
        let dense = self.dense_weight()?;
        let (rows, cols) = dense.dims2()?;
        let values = dense.flatten_all()?.to_vec1::<f32>()?;
        let Some(group) = [group_size, 64, 32].into_iter().find(|g| cols % g == 0) else {
            return Ok(self.clone());
        };
        let a = AffineMatrix::quantize(&values, rows, cols, bits, group, ScaleDType::F32)?;
        Ok(Linear {
            weight: LinearWeight::Packed(Arc::new(PackedMatrix::from_affine(&a))),
            bias: self.bias.clone(),
        })
    }

    /// The same layer with its weight as dense f32 values.
    pub fn dequantized(&self) -> Result<Linear> {
        Ok(Linear {
            weight: LinearWeight::Candle(QMatMul::Tensor(self.dense_weight()?)),
            bias: self.bias.clone(),
        })
    }

    /// The weight expanded to a dense f32 `[out, in]` tensor.
    fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Packed(p) => {
                Tensor::from_vec(p.dequantize(), (p.rows, p.cols), &Device::Cpu)?
            }
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?
            }
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [y] = Linear::forward_all([self], xs)?;
        Ok(y)
    }

    /// Several layers applied to the same input `[.., in]` (q/k/v, gate/up): those in our
    /// kernels' layout in one parallel operation over activations quantized once (what a
    /// fused projection gains), the others one by one.
    pub fn forward_all<const N: usize>(layers: [&Linear; N], xs: &Tensor) -> Result<[Tensor; N]> {
        let ys: Vec<Tensor> = Linear::products(&layers, xs)?
            .into_iter()
            .zip(layers)
            .map(|(y, l)| match &l.bias {
                Some(b) => Ok(y.broadcast_add(b)?),
                None => Ok(y),
            })
            .collect::<Result<_>>()?;
        ys.try_into()
            .map_err(|_| crate::Error::Engine("one output per layer".into()))
    }

    /// `xs · Wᵀ` for each layer, biases left out.
    fn products(layers: &[&Linear], xs: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<&PackedMatrix>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Packed(p) => Some(p.as_ref()),
                LinearWeight::Candle(_) => None,
            })
            .collect();
        let Some(mats) = packed.filter(|m| {
            m.iter()
                .all(|p| (p.cols, p.group_size) == (m[0].cols, m[0].group_size))
        }) else {
            // Mixed forms: one layer at a time.
            return layers
                .iter()
                .map(|l| match &l.weight {
                    LinearWeight::Candle(w) => Ok(w.forward(xs)?),
                    LinearWeight::Packed(_) => Ok(Linear::products(&[l], xs)?.remove(0)),
                })
                .collect();
        };
        let Some(&first) = mats.first() else {
            return Ok(Vec::new());
        };
        let dims = xs.dims().to_vec();
        if dims.last() != Some(&first.cols) {
            return Err(crate::Error::Engine(format!(
                "linear layer of input size {} applied to shape {dims:?}",
                first.cols
            )));
        }
        let m = xs.elem_count() / first.cols;
        let x = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let x = QuantizedRows::new(&x, m, first.cols, first.group_size);
        PackedMatrix::matmul_t_all(&mats, Isa::active(), &x)
            .into_iter()
            .zip(&mats)
            .map(|(y, p)| {
                let mut out_dims = dims.clone();
                if let Some(last) = out_dims.last_mut() {
                    *last = p.rows;
                }
                Ok(Tensor::from_vec(y, out_dims, xs.device())?)
            })
            .collect()
    }
}

/// Token embeddings `[vocab, d]` in any [`Weight`] form; rows are dequantized on lookup.
#[derive(Debug, Clone)]
pub struct Embedding(pub Weight);

impl Embedding {
    /// `ids: [t]` → `[t, d]` f32.
    pub fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match &self.0 {
            Weight::Ggml(q) => Ok(q
                .embedding(&Tensor::new(ids, device)?)?
                .to_dtype(DType::F32)?),
            Weight::Dense(t) => Ok(t.embedding(&Tensor::new(ids, device)?)?),
            Weight::Packed(p) => {
                let mut out = vec![0f32; ids.len() * p.cols];
                for (row, &id) in out.chunks_mut(p.cols).zip(ids) {
                    p.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), p.cols), device)?)
            }
        }
    }
}

/// Root-mean-square normalisation (Zhang & Sennrich, 2019) with a learned scale, or, with a
/// bias, LayerNorm (Ba et al., 2016: mean removed too), as Phi uses.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,       // [d]
    bias: Option<Tensor>, // [d], LayerNorm only
    eps: f32,
}

impl Norm {
    pub fn rms(weight: Tensor, eps: f64) -> Self {
        Norm {
            weight,
            bias: None,
            eps: eps as f32,
        }
    }

    pub fn layer(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Norm {
            weight,
            bias: Some(bias),
            eps: eps as f32,
        }
    }

    /// `[.., d]` → `[.., d]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            None => candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?,
            Some(b) => candle_nn::ops::layer_norm(xs, &self.weight, b, self.eps)?,
        })
    }
}

/// Rotary position embeddings (Su et al., 2021), either on adjacent pairs (the layout
/// llama.cpp's GGUF converter gives llama-family q/k weights, which it permutes) or on the
/// two halves of each head (GPT-NeoX / HF `rotate_half`, e.g. Gemma).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>, // [head_dim / 2]
    interleaved: bool,
    /// Multiplies the rotated dimensions (YaRN's attention factor; usually 1).
    scale: f32,
}

impl Rope {
    /// `inv_freq[i] = 1 / (theta^(2i/head_dim) * factor_i)`, where `factors` are llama 3's
    /// per-frequency divisors (or none) and `position_scale` divides positions (linear
    /// scaling, folded into the frequencies).
    pub fn new(
        head_dim: usize,
        theta: f32,
        factors: Option<&[f32]>,
        position_scale: f32,
        interleaved: bool,
    ) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
                let factor = factors.map_or(1.0, |fs| fs[i]);
                f / factor / position_scale
            })
            .collect();
        Rope {
            inv_freq,
            interleaved,
            scale: 1.0,
        }
    }

    pub fn with_attention_factor(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Rotates `xs: [rows, heads, head_dim]` in place, row `r` by `positions[r]`. When the
    /// rotary dimension is smaller than the head (Phi's partial rotary embeddings), only the
    /// first dimensions of each head turn and the rest pass through.
    pub fn rotate(&self, xs: &mut [f32], heads: usize, head_dim: usize, positions: &[usize]) {
        let half = self.inv_freq.len();
        let mut cos_sin = vec![(0f32, 0f32); half];
        for (row, &p) in xs.chunks_mut(heads * head_dim).zip(positions) {
            for (cs, &f) in cos_sin.iter_mut().zip(&self.inv_freq) {
                // f64 keeps large positions (long contexts) accurate.
                let (sin, cos) = (p as f64 * f64::from(f)).sin_cos();
                *cs = (cos as f32 * self.scale, sin as f32 * self.scale);
            }
            for head in row.chunks_mut(head_dim) {
                for (i, &(cos, sin)) in cos_sin.iter().enumerate() {
                    // Pairs: adjacent (2i, 2i + 1), or the two halves (i, i + half).
                    let (a, b) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (x, y) = (head[a], head[b]);
                    head[a] = x * cos - y * sin;
                    head[b] = x * sin + y * cos;
                }
            }
        }
    }
}

/// Gated feed-forward (Shazeer, 2020): `down(act(gate(x)) * up(x))`, SwiGLU with SiLU,
/// GeGLU with tanh-approximated GELU.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    /// The same MLP with `f` applied to each projection.
    pub fn map(&self, f: &mut impl FnMut(&Linear) -> Result<Linear>) -> Result<Mlp> {
        Ok(Mlp {
            gate_proj: f(&self.gate_proj)?,
            up_proj: f(&self.up_proj)?,
            down_proj: f(&self.down_proj)?,
            act: self.act,
        })
    }

    /// `[1, t, d]` → `[1, t, d]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_all([&self.gate_proj, &self.up_proj], xs)?;
        let gate = self.act.apply(&gate)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

/// The feed-forward part of a layer: one gated MLP, a plain two-layer MLP
/// (`fc2(act(fc1(x)))`, Phi), or a mixture of experts.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    Moe(MoeMlp),
}

impl FeedForward {
    /// The same layer with `f` applied to each linear layer (the router included).
    pub fn map(&self, f: &mut impl FnMut(&Linear) -> Result<Linear>) -> Result<FeedForward> {
        Ok(match self {
            FeedForward::Dense(mlp) => FeedForward::Dense(mlp.map(f)?),
            FeedForward::Plain { fc1, fc2, act } => FeedForward::Plain {
                fc1: f(fc1)?,
                fc2: f(fc2)?,
                act: *act,
            },
            FeedForward::Moe(moe) => FeedForward::Moe(MoeMlp {
                gate: f(&moe.gate)?,
                experts: moe
                    .experts
                    .iter()
                    .map(|e| e.map(f))
                    .collect::<Result<_>>()?,
                top_k: moe.top_k,
                norm_topk_prob: moe.norm_topk_prob,
            }),
        })
    }

    /// `[1, t, d]` → `[1, t, d]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(xs),
            FeedForward::Plain { fc1, fc2, act } => fc2.forward(&act.apply(&fc1.forward(xs)?)?),
            FeedForward::Moe(moe) => moe.forward(xs),
        }
    }
}

/// A sparse mixture of experts (Qwen 3 MoE, HF `Qwen3MoeSparseMoeBlock`): a router picks
/// the `top_k` experts with the highest softmax probability for each token, and the token's
/// output is their outputs weighted by those probabilities (renormalised to sum to one with
/// `norm_topk_prob`).
#[derive(Debug, Clone)]
pub struct MoeMlp {
    /// Router, `[num_experts, d]`.
    pub gate: Linear,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl MoeMlp {
    /// `[1, t, d]` → `[1, t, d]`. Routing is decided on the CPU; each chosen expert then
    /// runs once over all the tokens routed to it.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, t, d) = xs.dims3()?;
        let x = xs.reshape((t, d))?;
        let logits = self
            .gate
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?; // [t, E]
                                // Per expert: the tokens routed to it and their weights.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![]); self.experts.len()];
        for (token, row) in logits.iter().enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..row.len()).collect();
            // Highest probability first; ties keep the lower expert index (stable sort).
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
            let chosen = &order[..self.top_k.min(order.len())];
            let total: f32 = chosen.iter().map(|&e| exp[e] / sum).sum();
            for &e in chosen {
                let p = exp[e] / sum;
                routed[e].0.push(token as u32);
                routed[e]
                    .1
                    .push(if self.norm_topk_prob { p / total } else { p });
            }
        }
        let mut out = Tensor::zeros((t, d), DType::F32, xs.device())?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(routed) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::from_vec(tokens, n, xs.device())?;
            let y = expert
                .forward(&x.index_select(&idx, 0)?.unsqueeze(0)?)?
                .squeeze(0)?; // [n, d]
            let w = Tensor::from_vec(weights, (n, 1), xs.device())?;
            out = out.index_add(&idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out.unsqueeze(0)?)
    }
}

impl Activation {
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => candle_nn::ops::silu(xs)?,
            // candle's `gelu` is the tanh approximation (HF `gelu_pytorch_tanh`, `gelu_new`).
            Activation::GeluPytorchTanh => xs.gelu()?,
        })
    }
}

/// A dense f32 tensor from a stored tensor (norm weights are small and kept in f32).
pub fn dense(t: &QTensor, device: &Device) -> Result<Tensor> {
    Ok(t.dequantize(device)?.to_dtype(DType::F32)?)
}
