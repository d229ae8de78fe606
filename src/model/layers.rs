//! Building blocks of the decoder: linear layers over quantized weights, RMSNorm, rotary
//! position embeddings and the SwiGLU MLP. Shapes use `t` for tokens in a step and `d`
//! for hidden size.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::model::config::Activation;
use crate::model::math;
use crate::quant::kernels::QuantizedRows;
use crate::quant::{ggml, AffineMatrix, Isa, PackedMatrix, ScaleDType};

/// How a weight matrix `[out, in]` is stored in memory: affine groups in our kernels'
/// layout (MLX folders, and the GGML types that are affine: Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0 and the k-quants Q2_K to Q6_K; IQ4_NL and IQ4_XS as 8-bit groups whose codes are
/// 4-bit indices into their levels), other GGML blocks (run by candle), or dense f32
/// (float safetensors).
/// Quantized weights stay quantized; nothing is expanded to f32 at load.
#[derive(Debug, Clone)]
pub enum Weight {
    Ggml(Arc<QTensor>),
    Dense(Tensor),
    Packed(Arc<PackedMatrix>),
}

impl Weight {
    /// GGML blocks as read from a GGUF file: repacked for our kernels when they run the
    /// type (exactly, see `quant::ggml`), kept for candle's otherwise.
    pub fn from_ggml(q: Arc<QTensor>) -> Result<Weight> {
        let (rows, cols) = q.shape().dims2()?;
        Ok(match ggml::to_packed(q.dtype(), &q.data()?, rows, cols)? {
            Some(p) => Weight::Packed(Arc::new(p)),
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
    bias: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// GGML blocks or a dense matrix, through candle's `QMatMul`.
    Candle(QMatMul),
    /// Affine groups, through our kernels (`quant::kernels`).
    Packed(Arc<PackedMatrix>),
    /// On a GPU, in the form its kernels read (`crate::cuda`).
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::GpuLinear>),
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

    pub fn with_bias(self, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.map(|b| values(&b)).transpose()?;
        Ok(Linear { bias, ..self })
    }

    /// The same layer uploaded to `gpu` (bias included).
    #[cfg(feature = "cuda")]
    pub fn to_gpu(&self, gpu: &crate::cuda::Gpu) -> Result<Linear> {
        use crate::cuda::GpuLinear;
        let on_gpu = match &self.weight {
            LinearWeight::Packed(p) => GpuLinear::packed(gpu, p)?,
            LinearWeight::Candle(QMatMul::QTensor(q)) => GpuLinear::ggml(gpu, q)?,
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                let (rows, cols) = t.dims2()?;
                GpuLinear::dense(gpu, &values(t)?, rows, cols)?
            }
            LinearWeight::Cuda(_) => return Ok(self.clone()),
        };
        Ok(Linear {
            weight: LinearWeight::Cuda(Arc::new(on_gpu.with_bias(gpu, self.bias.as_deref())?)),
            bias: self.bias.clone(),
        })
    }

    /// Whether the weight is a bf16 matrix on a GPU.
    #[cfg(feature = "cuda")]
    pub fn is_bf16(&self) -> bool {
        self.gpu().is_some_and(crate::cuda::GpuLinear::is_bf16)
    }

    /// The layer's GPU form, when it has been uploaded.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&crate::cuda::GpuLinear> {
        match &self.weight {
            LinearWeight::Cuda(g) => Some(g),
            _ => None,
        }
    }

    /// Output size.
    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Packed(p) => p.rows,
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.shape().dims()[0],
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims()[0],
            #[cfg(feature = "cuda")]
            LinearWeight::Cuda(g) => g.out_features(),
        }
    }

    /// Whether the weight holds float values (not quantized blocks).
    pub fn is_float(&self) -> bool {
        match &self.weight {
            LinearWeight::Candle(w) => matches!(w, QMatMul::Tensor(_) | QMatMul::TensorF16(_)),
            LinearWeight::Packed(_) => false,
            #[cfg(feature = "cuda")]
            LinearWeight::Cuda(g) => g.is_float(),
        }
    }

    /// Bytes of the weight in memory.
    pub fn nbytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            LinearWeight::Packed(p) => p.nbytes(),
            #[cfg(feature = "cuda")]
            LinearWeight::Cuda(g) => g.nbytes(),
        }
    }

    /// The same layer with its weight requantized to MLX affine groups of `bits` (the bias
    /// is kept): the matrix is expanded one layer at a time and packed again, except packed
    /// weights of that width already (GGML's Q4_0/Q4_1 or Q4_K at 4 bits, Q6_K at 6, say),
    /// which stay exactly as they are. A matrix whose width no group size divides stays as it is too.
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
            #[cfg(feature = "cuda")]
            LinearWeight::Cuda(_) => return Err(on_gpu()),
        })
    }

    /// `xs: [.., in]` → `[.., out]` as a new tensor (the mixture of experts' routing
    /// works on tensors; the decoder's main path uses [`Linear::forward_rows`]).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [y] = Linear::forward_all([self], xs)?;
        Ok(y)
    }

    /// [`Linear::forward_rows`] on tensors.
    pub fn forward_all<const N: usize>(layers: [&Linear; N], xs: &Tensor) -> Result<[Tensor; N]> {
        let dims = xs.dims().to_vec();
        let cols = dims.last().copied().unwrap_or(1);
        let x = values(xs)?;
        let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        let mut quantized = QuantizedRows::default();
        Linear::forward_rows(
            layers,
            &x,
            x.len() / cols.max(1),
            outs.each_mut(),
            &mut quantized,
        )?;
        let mut ys = Vec::with_capacity(N);
        for (y, l) in outs.into_iter().zip(layers) {
            let mut out_dims = dims.clone();
            if let Some(last) = out_dims.last_mut() {
                *last = l.out_features();
            }
            ys.push(Tensor::from_vec(y, out_dims, xs.device())?);
        }
        ys.try_into()
            .map_err(|_| crate::Error::Internal("one output per layer".into()))
    }

    /// Several layers applied to the same input `x: [m, in]`, each into its `outs[i]`
    /// (resized to `[m, out_i]`; no allocation once it has the capacity): those in our
    /// kernels' layout in one parallel operation over activations quantized once into
    /// `quantized` (what a fused q/k/v or gate/up projection gains), the others one by one
    /// through candle.
    pub fn forward_rows<const N: usize>(
        layers: [&Linear; N],
        x: &[f32],
        m: usize,
        mut outs: [&mut Vec<f32>; N],
        quantized: &mut QuantizedRows,
    ) -> Result<()> {
        for (out, l) in outs.iter_mut().zip(layers) {
            out.resize(m * l.out_features(), 0.0);
        }
        Linear::products(
            layers,
            x,
            m,
            outs.each_mut().map(|o| o.as_mut_slice()),
            quantized,
        )?;
        for (out, l) in outs.iter_mut().zip(layers) {
            if let Some(b) = &l.bias {
                for row in out.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            }
        }
        Ok(())
    }

    /// `x · Wᵀ` for each layer into `outs[i]: [m, out_i]`, biases left out.
    fn products<const N: usize>(
        layers: [&Linear; N],
        x: &[f32],
        m: usize,
        mut outs: [&mut [f32]; N],
        quantized: &mut QuantizedRows,
    ) -> Result<()> {
        let packed: Option<[&PackedMatrix; N]> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Packed(p) => Some(p.as_ref()),
                LinearWeight::Candle(_) => None,
                #[cfg(feature = "cuda")]
                LinearWeight::Cuda(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.try_into().ok())
            .filter(|m: &[&PackedMatrix; N]| {
                m.iter()
                    .all(|p| (p.cols, p.group_size) == (m[0].cols, m[0].group_size))
            });
        match packed {
            Some(mats) if N > 0 => {
                let cols = mats[0].cols;
                if x.len() != m * cols {
                    return Err(crate::Error::Internal(format!(
                        "linear layer of input size {cols} applied to {} values in {m} rows",
                        x.len()
                    )));
                }
                quantized.quantize(x, m, cols, mats[0].group_size);
                PackedMatrix::matmul_t_all_into(mats, Isa::active(), quantized, outs);
            }
            _ => {
                // Mixed or candle forms: one layer at a time.
                for (out, l) in outs.iter_mut().zip(layers) {
                    match &l.weight {
                        LinearWeight::Candle(w) => {
                            let cols = x.len() / m.max(1);
                            let y = w.forward(&Tensor::from_slice(x, (m, cols), &Device::Cpu)?)?;
                            out.copy_from_slice(&values(&y)?);
                        }
                        LinearWeight::Packed(_) => {
                            Linear::products([l], x, m, [&mut **out], quantized)?;
                        }
                        #[cfg(feature = "cuda")]
                        LinearWeight::Cuda(_) => return Err(on_gpu()),
                    }
                }
            }
        }
        Ok(())
    }
}

/// A host computation handed a layer that lives on a GPU.
#[cfg(feature = "cuda")]
fn on_gpu() -> crate::Error {
    crate::Error::Internal("a GPU layer in a CPU computation".into())
}

/// Token embeddings `[vocab, d]` in any [`Weight`] form; rows are dequantized on lookup.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Weight,
    /// A copy on the GPU the decoder runs on, which gathers there (not for GGML blocks:
    /// those stay on the host).
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<crate::cuda::GpuEmbedding>>,
}

impl Embedding {
    pub fn new(weight: Weight) -> Embedding {
        Embedding {
            weight,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// The same table with a copy on `gpu` where its form allows (the host copy stays:
    /// it is what the CPU reads, and GGML blocks are looked up there); the copy's bytes.
    #[cfg(feature = "cuda")]
    pub fn to_gpu(&self, gpu: &crate::cuda::Gpu) -> Result<(Embedding, usize)> {
        use crate::cuda::GpuEmbedding;
        let on_gpu = match &self.weight {
            Weight::Packed(p) if p.group_size >= 32 => Some(GpuEmbedding::packed(gpu, p)?),
            Weight::Dense(t) => {
                let (rows, cols) = t.dims2()?;
                Some(GpuEmbedding::dense(gpu, &values(t)?, rows, cols)?)
            }
            // GGML blocks and the k-quants in groups of 16 (which the GPU's affine kernels
            // do not take) are looked up on the host.
            Weight::Packed(_) | Weight::Ggml(_) => None,
        };
        let bytes = on_gpu.as_ref().map_or(0, GpuEmbedding::nbytes);
        Ok((
            Embedding {
                weight: self.weight.clone(),
                gpu: on_gpu.map(Arc::new),
            },
            bytes,
        ))
    }

    /// The table's GPU copy, when it has one.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&crate::cuda::GpuEmbedding> {
        self.gpu.as_deref()
    }

    /// `ids: [t]` → `out: [t, d]` f32.
    pub fn forward_into(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        match &self.weight {
            Weight::Ggml(q) => {
                out.copy_from_slice(&values(&q.embedding(&Tensor::new(ids, &Device::Cpu)?)?)?);
            }
            Weight::Dense(t) => {
                out.copy_from_slice(&values(&t.embedding(&Tensor::new(ids, &Device::Cpu)?)?)?);
            }
            Weight::Packed(p) => {
                // A prompt's rows over the compute threads (serial, a 512-token prompt of
                // the 1B shape took 15-20 ms at any thread count).
                let per_task = crate::threads::rows_per_task(ids.len(), p.cols);
                crate::threads::parallel_chunks_mut(out, per_task * p.cols, &|task, rows| {
                    for (row, &id) in rows.chunks_mut(p.cols).zip(&ids[task * per_task..]) {
                        p.dequantize_row(id as usize, row);
                    }
                });
            }
        }
        Ok(())
    }
}

/// Root-mean-square normalisation (Zhang & Sennrich, 2019) with a learned scale, or, with a
/// bias, LayerNorm (Ba et al., 2016: mean removed too), as Phi uses.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Vec<f32>,       // [d]
    bias: Option<Vec<f32>>, // [d], LayerNorm only
    eps: f32,
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Norm {
    pub fn rms(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Norm {
            weight: values(&weight)?,
            bias: None,
            eps: eps as f32,
        })
    }

    pub fn layer(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Norm {
            weight: values(&weight)?,
            bias: Some(values(&bias)?),
            eps: eps as f32,
        })
    }

    /// `(weight, bias, eps)`: what a GPU kernel needs.
    pub fn parts(&self) -> (&[f32], Option<&[f32]>, f32) {
        (&self.weight, self.bias.as_deref(), self.eps)
    }

    /// Normalises each row of `xs: [.., d]` in place, with candle's `rms_norm` and
    /// `layer_norm` formulas (f32 sums, in 8 interleaved partial sums; `x / sqrt(mean +
    /// eps)`); a batch's rows are split over the compute threads.
    pub fn apply(&self, xs: &mut [f32]) {
        let d = self.weight.len();
        let rows_per_task = crate::threads::rows_per_task(xs.len() / d.max(1), d);
        crate::threads::parallel_chunks_mut(xs, rows_per_task * d, &|_, rows| {
            rows.chunks_exact_mut(d).for_each(|row| self.apply_row(row));
        });
    }

    /// `out ← xs` normalised as [`Norm::apply`] does, each task copying its own rows (a
    /// serial copy first took most of a 16-thread prefill's norms).
    pub fn apply_into(&self, xs: &[f32], out: &mut Vec<f32>) {
        let d = self.weight.len();
        // Resized only when the shape changes: a reused buffer is written once.
        out.resize(xs.len(), 0.0);
        let rows_per_task = crate::threads::rows_per_task(xs.len() / d.max(1), d);
        crate::threads::parallel_chunks_mut(out, rows_per_task * d, &|task, rows| {
            let src = &xs[task * rows_per_task * d..][..rows.len()];
            for (row, src) in rows.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                row.copy_from_slice(src);
                self.apply_row(row);
            }
        });
    }

    fn apply_row(&self, row: &mut [f32]) {
        let d = self.weight.len() as f32;
        match &self.bias {
            None => {
                let m = (math::sum(row, |x| x * x) / d + self.eps).sqrt();
                for (x, w) in row.iter_mut().zip(&self.weight) {
                    *x = *x / m * w;
                }
            }
            Some(bias) => {
                let mean = math::sum(row, |x| x) / d;
                let var = math::sum(row, |x| (x - mean) * (x - mean)) / d;
                let std = (var + self.eps).sqrt();
                for ((x, w), b) in row.iter_mut().zip(&self.weight).zip(bias) {
                    *x = (*x - mean) / std * w + b;
                }
            }
        }
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
    /// The rotations of the last positions rotated: every layer of a pass rotates the same
    /// positions, and one `sin_cos` in f64 costs ~20 ns (SmolLM2, 16 decoding sequences:
    /// 16 rows × 32 frequencies × 30 layers, ~0.5 ms of a 16 ms step).
    last: RotationCache,
}

/// `cos · scale, sin · scale` of each frequency at each of `positions`: `[rows, half]`.
#[derive(Debug)]
struct Rotations {
    positions: Vec<usize>,
    cos_sin: Vec<(f32, f32)>,
}

/// A [`Rope`]'s last [`Rotations`] (a clone starts empty).
#[derive(Debug, Default)]
struct RotationCache(parking_lot::Mutex<Option<Arc<Rotations>>>);

impl Clone for RotationCache {
    fn clone(&self) -> Self {
        RotationCache::default()
    }
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
            last: RotationCache::default(),
        }
    }

    /// `(inv_freq, interleaved, scale)`: what a GPU kernel needs.
    pub fn parts(&self) -> (&[f32], bool, f32) {
        (&self.inv_freq, self.interleaved, self.scale)
    }

    #[must_use]
    pub fn with_attention_factor(mut self, scale: f32) -> Self {
        self.scale = scale;
        self.last = RotationCache::default();
        self
    }

    /// Rotates the queries `q: [rows, heads, head_dim]` and keys `k: [rows, kv_heads,
    /// head_dim]` in place, row `r` by `positions[r]` (one cos/sin per frequency and row for
    /// both). When the rotary dimension is smaller than the head (Phi's partial rotary
    /// embeddings), only the first dimensions of each head turn and the rest pass through.
    /// A batch's rows are split over the compute threads.
    pub fn rotate(&self, (q, k): (&mut [f32], &mut [f32]), head_dim: usize, positions: &[usize]) {
        let rows = positions.len();
        let (q_width, k_width) = (q.len() / rows.max(1), k.len() / rows.max(1));
        assert!(
            q.len() == rows * q_width
                && k.len() == rows * k_width
                && (rows == 0 || (q_width > 0 && k_width > 0)),
            "queries and keys of {rows} rows"
        );
        let half = self.inv_freq.len();
        if half == 0 {
            return; // no rotary dimensions (GPT-2's learned positions)
        }
        let rotations = self.rotations(positions);
        let rows_per_task = crate::threads::rows_per_task(rows, q_width + k_width);
        let k_base = crate::threads::SendPtr(k.as_mut_ptr());
        crate::threads::parallel_chunks_mut(q, rows_per_task * q_width, &|task, q| {
            let first = task * rows_per_task;
            // SAFETY: tasks take disjoint rows of `k` (the same rows as of `q`), which stays
            // mutably borrowed until every task has finished.
            #[allow(unsafe_code)]
            let k = unsafe {
                std::slice::from_raw_parts_mut(
                    k_base.get().add(first * k_width),
                    q.len() / q_width * k_width,
                )
            };
            let rows = q.chunks_mut(q_width).zip(k.chunks_mut(k_width));
            let turns = rotations.cos_sin[first * half..].chunks(half);
            for ((q, k), turns) in rows.zip(turns) {
                self.rotate_row([q, k], head_dim, turns);
            }
        });
    }

    /// The rotations at `positions`: the last ones if they were at the same positions.
    fn rotations(&self, positions: &[usize]) -> Arc<Rotations> {
        let mut last = self.last.0.lock();
        if let Some(r) = last.as_ref().filter(|r| r.positions == positions) {
            return Arc::clone(r);
        }
        let half = self.inv_freq.len();
        let mut cos_sin = vec![(0f32, 0f32); positions.len() * half];
        // A `sin_cos` weighs as ~16 of the elementwise operations `rows_per_task` counts.
        let rows_per_task = crate::threads::rows_per_task(positions.len(), 16 * half);
        crate::threads::parallel_chunks_mut(&mut cos_sin, rows_per_task * half, &|task, rows| {
            let first = task * rows_per_task;
            for (row, &p) in rows.chunks_mut(half).zip(&positions[first..]) {
                for (cs, &f) in row.iter_mut().zip(&self.inv_freq) {
                    // f64 keeps large positions (long contexts) accurate.
                    let (sin, cos) = (p as f64 * f64::from(f)).sin_cos();
                    *cs = (cos as f32 * self.scale, sin as f32 * self.scale);
                }
            }
        });
        let r = Arc::new(Rotations {
            positions: positions.to_vec(),
            cos_sin,
        });
        *last = Some(Arc::clone(&r));
        r
    }

    /// One row of each of `xs` (`[heads, head_dim]` each), turned by `turns` (its
    /// [`Rotations`]).
    fn rotate_row(&self, mut xs: [&mut [f32]; 2], head_dim: usize, turns: &[(f32, f32)]) {
        let half = self.inv_freq.len();
        let turn = |x: &mut f32, y: &mut f32, (cos, sin): (f32, f32)| {
            (*x, *y) = (*x * cos - *y * sin, *x * sin + *y * cos);
        };
        // Pairs: adjacent (2i, 2i + 1), or the two halves (i, i + half). Zipped slices
        // rather than indices, so that the loops hold no bounds checks and vectorise.
        for head in xs.iter_mut().flat_map(|x| x.chunks_mut(head_dim)) {
            if self.interleaved {
                let (pairs, _) = head[..2 * half].as_chunks_mut::<2>();
                for ([x, y], &t) in pairs.iter_mut().zip(turns) {
                    turn(x, y, t);
                }
            } else {
                let (low, high) = head[..2 * half].split_at_mut(half);
                for ((x, y), &t) in low.iter_mut().zip(high).zip(turns) {
                    turn(x, y, t);
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

    /// `[1, t, d]` → `[1, t, d]` (the mixture of experts' experts, on tensors; the
    /// decoder composes its dense MLPs from the same operations over its own buffers).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, t, d) = xs.dims3()?;
        let x = values(xs)?;
        let (mut gate, mut up, mut out) = (Vec::new(), Vec::new(), Vec::new());
        let mut quantized = QuantizedRows::default();
        let projections = [&self.gate_proj, &self.up_proj];
        Linear::forward_rows(projections, &x, t, [&mut gate, &mut up], &mut quantized)?;
        self.act.gated(&mut gate, &up);
        Linear::forward_rows([&self.down_proj], &gate, t, [&mut out], &mut quantized)?;
        Ok(Tensor::from_vec(out, (1, t, d), xs.device())?)
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
    /// The routing of `t` tokens from the router's `logits: [t, num_experts]`: per expert,
    /// the tokens routed to it and their weights.
    pub fn route(&self, logits: &[f32], t: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(vec![], vec![]); self.experts.len()];
        for (token, row) in logits.chunks_exact(self.experts.len()).take(t).enumerate() {
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
        routed
    }

    /// `[1, t, d]` → `[1, t, d]`. Routing is decided on the CPU; each chosen expert then
    /// runs once over all the tokens routed to it.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, t, d) = xs.dims3()?;
        let x = xs.reshape((t, d))?;
        let logits = self
            .gate
            .forward(&x)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let routed = self.route(&logits, t);
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
    /// In place.
    pub fn apply(self, xs: &mut [f32]) {
        match self {
            Activation::Silu => math::zip_in_place(xs, None, |x, _| math::silu(x)),
            Activation::GeluPytorchTanh => math::zip_in_place(xs, None, |x, _| math::gelu_tanh(x)),
        }
    }

    /// `gate ← act(gate) · up`, in place (the gated MLP's product).
    pub fn gated(self, gate: &mut [f32], up: &[f32]) {
        match self {
            Activation::Silu => math::zip_in_place(gate, Some(up), |g, u| math::silu(g) * u),
            Activation::GeluPytorchTanh => {
                math::zip_in_place(gate, Some(up), |g, u| math::gelu_tanh(g) * u);
            }
        }
    }
}

/// A dense f32 tensor from a stored tensor (norm weights are small and kept in f32).
pub fn dense(t: &QTensor, device: &Device) -> Result<Tensor> {
    Ok(t.dequantize(device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotations kept from one call serve only the same positions: a rope rotating other
    /// positions, then the first again, matches the formula each time (both pair layouts).
    #[test]
    fn rotations_follow_the_positions() {
        let (hd, heads, theta) = (8, 2, 10_000f32);
        for interleaved in [true, false] {
            let rope = Rope::new(hd, theta, None, 1.0, interleaved);
            let x: Vec<f32> = (0..2 * heads * hd)
                .map(|i| (i as f32 * 0.7).cos())
                .collect();
            let k: Vec<f32> = x[..2 * hd].to_vec();
            for positions in [[0, 1], [5, 9], [0, 1], [7, 7]] {
                let (mut q2, mut k2) = (x.clone(), k.clone());
                rope.rotate((&mut q2, &mut k2), hd, &positions);
                // The formula in f64: pair (a, b) of a head turned by p · θ^(−2i / hd).
                let expect = |x: &[f32], width: usize| -> Vec<f32> {
                    let mut out = x.to_vec();
                    for (r, &p) in positions.iter().enumerate() {
                        for head in out[r * width..(r + 1) * width].chunks_mut(hd) {
                            for i in 0..hd / 2 {
                                let (a, b) = if interleaved {
                                    (2 * i, 2 * i + 1)
                                } else {
                                    (i, i + hd / 2)
                                };
                                let angle =
                                    p as f64 / f64::from(theta).powf(2.0 * i as f64 / hd as f64);
                                let (xa, xb) = (f64::from(head[a]), f64::from(head[b]));
                                head[a] = (xa * angle.cos() - xb * angle.sin()) as f32;
                                head[b] = (xa * angle.sin() + xb * angle.cos()) as f32;
                            }
                        }
                    }
                    out
                };
                for (got, want) in [(q2, expect(&x, heads * hd)), (k2, expect(&k, hd))] {
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() < 1e-5, "{positions:?}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Layers of different forms (our kernels' layout and a dense matrix) with biases, run
    /// together, give what each gives alone: the bias is added once.
    #[test]
    fn mixed_forms_with_biases_match_each_alone() {
        let (out, inp) = (8, 64);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let bias = Tensor::new(
            (0..out).map(|i| i as f32).collect::<Vec<f32>>(),
            &Device::Cpu,
        )
        .unwrap();
        let affine = AffineMatrix::quantize(&w, out, inp, 4, 32, ScaleDType::F32).unwrap();
        let packed = Linear::new(Weight::from_affine(&affine))
            .unwrap()
            .with_bias(Some(bias.clone()))
            .unwrap();
        let dense = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        let dense = Linear::new(Weight::Dense(dense))
            .unwrap()
            .with_bias(Some(bias))
            .unwrap();
        let x = Tensor::from_vec(
            (0..2 * inp).map(|i| (i as f32).sin()).collect::<Vec<f32>>(),
            (2, inp),
            &Device::Cpu,
        )
        .unwrap();
        let [a, b] = Linear::forward_all([&packed, &dense], &x).unwrap();
        for (joint, alone) in [
            (a, packed.forward(&x).unwrap()),
            (b, dense.forward(&x).unwrap()),
        ] {
            let (joint, alone) = (values(&joint).unwrap(), values(&alone).unwrap());
            assert_eq!(joint, alone);
        }
        // And the alone products carry the bias exactly once: row 0 of the dense layer.
        let plain = Linear::new(Weight::Dense(
            Tensor::from_vec(
                (0..out * inp)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect::<Vec<f32>>(),
                (out, inp),
                &Device::Cpu,
            )
            .unwrap(),
        ))
        .unwrap();
        let (with, without) = (
            values(&dense.forward(&x).unwrap()).unwrap(),
            values(&plain.forward(&x).unwrap()).unwrap(),
        );
        for (i, (a, b)) in with.iter().zip(&without).enumerate() {
            assert!((a - b - (i % out) as f32).abs() < 1e-4, "{i}: {a} vs {b}");
        }
    }
}
