//! Linear layers on the GPU, uploaded once at load in the form their kernels read:
//!
//! - float matrices in the narrowest float type that holds every value exactly (bf16
//!   checkpoints come back to bf16, which the host keeps widened to f32): half types
//!   through our GEMV for up to [`GEMV_MAX_ROWS`] rows (bf16: [`BF16_GEMV_MAX_ROWS`]),
//!   cuBLAS otherwise and for f32;
//! - affine groups (MLX 2–8 bit, and GGUF Q4_0–Q8_0, Q4_K and Q5_K, which the loader already
//!   turned into affine groups), through our kernels. 2, 4 and 8-bit codes are repacked into the
//!   integer layout (`quant::affine::int_layout`): up to [`GEMV_MAX_ROWS`] rows, a GEMV
//!   (dp4a) multiplies them by activations rounded to int8 per block of 32, as llama.cpp's
//!   MMVQ and Cortex's CPU kernels do; above, a GEMM on the bf16 tensor cores dequantizes
//!   them in registers (kernels.cu `affine_mma`); from [`DEQUANT_MIN_ROWS`] rows (long
//!   prompts) they are dequantized to bf16 in memory for cuBLAS's GEMM instead. 3, 5 and
//!   6-bit codes straddle words and stay in MLX's layout, with f32 activations: a GEMV for
//!   up to [`GEMV_MAX_ROWS`] rows, dequantize-then-GEMM above;
//! - other GGML blocks (the other k-quants) through candle's CUDA kernels (llama.cpp's
//!   MMVQ/MMQ).

use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Storage, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

use super::{device_error, ptr, Arg, Gpu, GpuBuf};
use crate::error::{Error, Result};
use crate::quant::affine::int_layout;
use crate::quant::{ggml, AffineMatrix, PackedMatrix, ScaleDType};

/// Rows of input up to which affine and half layers run the GEMV kernels (they keep a sum
/// per row of input in registers); above, cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

/// Rows up to which bf16 matrices run the block GEMV; above, cuBLAS's GEMM on the tensor
/// cores. Measured on the H200 (8B bf16, ms a decode step at 1/2/4/8/16 rows): the GEMV up
/// to 8 rows 4.67/5.69/7.76/13.46, cuBLAS from 3 rows 6.17 at 4 and 6.58 at 8, so at 8 rows
/// twice as fast even without CUDA graphs (cuBLAS may allocate, so those steps run op by op).
const BF16_GEMV_MAX_ROWS: usize = 2;

/// Output rows per block of the block GEMVs (kernels.cu `BG_ROWS`; the float ones'
/// `BG_WARPS · DG_WARP_ROWS`), threads per block (`BG_WARPS` warps), and the most matrices
/// one launch takes.
const BG_ROWS: usize = 8;
const DG_ROWS: usize = 16;
const BG_THREADS: u32 = 128;
const GEMV_MATRICES: usize = 3;

/// The quantized GEMM's blocks (kernels.cu `affine_mma`, `AM_*`): weight rows and threads
/// a block, most rows of input a block (4 tiles of 16), and chunks of 32 codes a span.
const AM_ROWS: usize = 128;
const AM_THREADS: u32 = 128;
const AM_M: usize = 64;
const AM_SPAN: usize = 4;

/// Rows of input from which 2/4/8-bit layers multiply on cuBLAS's bf16 tensor cores, their
/// weights dequantized to bf16 in memory (kernels.cu `int_dequant`), rather than by the
/// quantized GEMM: writing and reading back bf16 weights is a fixed cost, which cuBLAS's
/// rate (230–370 TFLOPS at 256–512 rows) repays from about 128 rows on the H200. At 128 the
/// two are about even (`benches/gpu_kernels.py`, µs, quantized GEMM against dequantize +
/// cuBLAS: 4096×4096 43.1 / 42.4, 14336×4096 103.2 / 119.2, 4096×14336 126.9 / 121.6).
/// Above a graph's rows (`graph.rs`).
pub const DEQUANT_MIN_ROWS: usize = 128;

/// Most bytes of weights dequantized at a time: an 8B model's largest matrix whole. Slices
/// small enough for L2 (16 MiB) made GEMMs of too few tiles to fill the GPU.
const DEQUANT_SLICE_BYTES: usize = 256 << 20;

/// Float values in one of the types the kernels and cuBLAS read.
enum Floats {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
    BF16(CudaSlice<u16>),
}

impl Floats {
    /// `values` in the narrowest type that holds each of them exactly.
    fn exact(gpu: &Gpu, values: &[f32]) -> Result<Floats> {
        use rayon::prelude::*;
        // Every value of an 8B checkpoint is looked at: on every core.
        let dtype = if values
            .par_iter()
            .all(|x| x.to_bits().trailing_zeros() >= 16)
        {
            ScaleDType::BF16
        } else if values.par_iter().all(|&x| f16::from_f32(x).to_f32() == x) {
            ScaleDType::F16
        } else {
            ScaleDType::F32
        };
        Floats::stored(gpu, values, dtype)
    }

    /// `values` (scales or biases, or a matrix) in `dtype`, rounded to nearest.
    fn stored(gpu: &Gpu, values: &[f32], dtype: ScaleDType) -> Result<Floats> {
        use rayon::prelude::*;
        let halves = |half: fn(f32) -> u16| values.par_iter().map(|&x| half(x)).collect::<Vec<_>>();
        Ok(match dtype {
            ScaleDType::F32 => Floats::F32(gpu.upload(values)?),
            ScaleDType::F16 => Floats::F16(gpu.upload(&halves(|x| f16::from_f32(x).to_bits()))?),
            ScaleDType::BF16 => Floats::BF16(gpu.upload(&halves(|x| bf16::from_f32(x).to_bits()))?),
        })
    }

    fn arg(&self, gpu: &Gpu) -> Arg {
        match self {
            Floats::F32(s) => ptr(s, gpu.stream()),
            Floats::F16(s) | Floats::BF16(s) => ptr(s, gpu.stream()),
        }
    }

    /// The kernels' name for the type.
    fn suffix(&self) -> &'static str {
        match self {
            Floats::F32(_) => "f32",
            Floats::F16(_) => "f16",
            Floats::BF16(_) => "bf16",
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Floats::F32(s) => s.len() * 4,
            Floats::F16(s) | Floats::BF16(s) => s.len() * 2,
        }
    }
}

enum Form {
    Dense(Floats),
    Affine {
        packed: CudaSlice<u32>,
        scales: Floats,
        biases: Floats,
        bits: u32,
        group_size: usize,
        /// Codes in the integer layout (2, 4, 8 bits: q8 activations), else in MLX's.
        int: bool,
        /// The kernels for these bits and scale type (named once, not per call): the GEMV
        /// (for the integer layout, without its `_m{rows}` suffix), and for more rows the
        /// quantized GEMM (integer layout, without its `_t{tiles}` suffix) or the
        /// dequantizer (MLX's).
        gemv: String,
        gemm: String,
    },
    /// GGML blocks on candle's CUDA device.
    Ggml(QMatMul),
}

/// A linear layer `[.., cols]` → `[.., rows]` on the GPU.
pub struct GpuLinear {
    form: Form,
    rows: usize,
    cols: usize,
    bias: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for GpuLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = match &self.form {
            Form::Dense(w) => format!("dense {}", w.suffix()),
            Form::Affine {
                bits, group_size, ..
            } => format!("affine {bits}-bit g{group_size}"),
            Form::Ggml(_) => "ggml".into(),
        };
        write!(f, "GpuLinear({}x{}, {form})", self.rows, self.cols)
    }
}

/// What a linear layer computes in besides its input and output: the input cast for
/// cuBLAS, and a matrix expanded from affine groups.
#[derive(Default)]
pub struct Scratch {
    half: Option<CudaSlice<u16>>,
    dense: Option<CudaSlice<f32>>,
    /// A slice of 2/4/8-bit weight rows dequantized to bf16 (kernels.cu `int_dequant`).
    wide: Option<CudaSlice<u16>>,
    /// The input rounded to int8 for the q8 GEMV: codes `[m, k]`, and per block of 32 the
    /// scale and the sum of the rounded values, in pairs (kernels.cu `quantize_q8`).
    q8: Option<CudaSlice<i8>>,
    q8_ds: Option<CudaSlice<f32>>,
    /// The input of the quantized GEMM in bf16, quads reordered (kernels.cu
    /// `cast_f32_bf16_quads`), `m` rounded up to whole blocks of [`AM_M`] rows.
    quads: Option<CudaSlice<u16>>,
    /// The quantized GEMM's partial sums, `[parts, m, rows]`, when it splits k.
    parts: Option<CudaSlice<f32>>,
    /// The attention's partial results when it splits a row's keys, and a ticket counter
    /// per block column (kernels.cu `attention`; zero between launches).
    attn_parts: Option<CudaSlice<f32>>,
    attn_counts: Option<CudaSlice<u32>>,
    /// Which buffer `q8` holds the rounding of, written by the kernel that computed it
    /// (a norm, a gated activation): `(Gpu::launches after that kernel, its address,
    /// values, the address of the codes)`. The next linear layers skip `quantize_q8` when
    /// no kernel came between.
    q8_of: Option<(u64, u64, usize, u64)>,
}

impl Scratch {
    /// Where a kernel that computes `len` values (a linear layer's input) may round them
    /// to q8 as well (blocks of 32 in order, as `quantize_q8` lays them out), for the
    /// layer to skip `quantize_q8`: the codes and pairs, when earlier passes have already
    /// grown them to hold that many (so models without q8 layers never pay for it, and
    /// nothing grows during a graph's capture); else None.
    pub(crate) fn q8_target(&self, gpu: &Gpu, len: usize) -> Option<[Arg; 2]> {
        let (codes, pairs) = (self.q8.as_ref()?, self.q8_ds.as_ref()?);
        (len.is_multiple_of(32) && codes.len() >= len && pairs.len() >= len / 16)
            .then(|| [ptr(codes, gpu.stream()), ptr(pairs, gpu.stream())])
    }

    /// The kernel just launched rounded buffer `x` of `len` values into
    /// [`Scratch::q8_target`].
    pub(crate) fn q8_written(&mut self, gpu: &Gpu, x: Arg, len: usize) {
        self.q8_of = match (x, self.q8.as_ref().map(|c| ptr(c, gpu.stream()))) {
            (Arg::Ptr(p), Some(Arg::Ptr(codes))) => Some((gpu.launches(), p, len, codes)),
            _ => None,
        };
    }

    /// The attention's split buffers: `parts` values and `counts` counters.
    pub(crate) fn attention(
        &mut self,
        gpu: &Gpu,
        parts: usize,
        counts: usize,
    ) -> Result<(Arg, Arg)> {
        let p = ptr(grown(gpu, &mut self.attn_parts, parts)?, gpu.stream());
        let c = ptr(grown(gpu, &mut self.attn_counts, counts)?, gpu.stream());
        Ok((p, c))
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

/// `slot` holding at least `len` elements (grown, never shrunk).
fn grown<
    'a,
    T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
>(
    gpu: &Gpu,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        gpu.bump_epoch();
        *slot = Some(gpu.zeros(len)?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::Internal("scratch buffer missing".into()))
}

impl GpuLinear {
    /// A float matrix `[rows, cols]` of f32 values.
    pub fn dense(gpu: &Gpu, values: &[f32], rows: usize, cols: usize) -> Result<GpuLinear> {
        Ok(GpuLinear {
            form: Form::Dense(Floats::exact(gpu, values)?),
            rows,
            cols,
            bias: None,
        })
    }

    /// Affine groups in our CPU kernels' layout, back in MLX's for the GPU's; Q2_K, Q3_K
    /// and Q6_K (groups of 16) back in their blocks, for candle's.
    pub fn packed(gpu: &Gpu, p: &PackedMatrix) -> Result<GpuLinear> {
        match ggml::to_ggml(p) {
            Some((dtype, blocks)) => GpuLinear::ggml(
                gpu,
                &qtensor_from_ggml(
                    dtype,
                    &blocks,
                    vec![p.rows, p.cols],
                    &candle_core::Device::Cpu,
                )?,
            ),
            None => GpuLinear::affine(gpu, &p.to_affine()?),
        }
    }

    pub fn affine(gpu: &Gpu, a: &AffineMatrix) -> Result<GpuLinear> {
        let scales = Floats::stored(gpu, &a.scales, a.scale_dtype)?;
        let (bits, stype) = (a.bits, scales.suffix());
        let int = matches!(bits, 2 | 4 | 8);
        let (packed, gemv, gemm) = if int {
            (
                gpu.upload(&int_layout(&a.packed, bits))?,
                format!("q8_gemv_{bits}_{stype}"),
                format!("affine_mma_{bits}_{stype}"),
            )
        } else {
            (
                gpu.upload(&a.packed)?,
                format!("affine_gemv_{bits}_{stype}"),
                format!("affine_dequant_{bits}_{stype}"),
            )
        };
        Ok(GpuLinear {
            form: Form::Affine {
                packed,
                biases: Floats::stored(gpu, &a.biases, a.scale_dtype)?,
                scales,
                bits,
                group_size: a.group_size,
                int,
                gemv,
                gemm,
            },
            rows: a.rows,
            cols: a.cols,
            bias: None,
        })
    }

    /// GGML blocks: float types become dense matrices, the others stay blocks for
    /// candle's kernels.
    pub fn ggml(gpu: &Gpu, q: &QTensor) -> Result<GpuLinear> {
        let (rows, cols) = q.shape().dims2()?;
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let values = q
                .dequantize(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            return GpuLinear::dense(gpu, &values, rows, cols);
        }
        let on_gpu = qtensor_from_ggml(
            q.dtype(),
            &q.data()?,
            vec![rows, cols],
            &gpu.candle_device(),
        )?;
        Ok(GpuLinear {
            form: Form::Ggml(QMatMul::from_arc(Arc::new(on_gpu))?),
            rows,
            cols,
            bias: None,
        })
    }

    pub fn with_bias(mut self, gpu: &Gpu, bias: Option<&[f32]>) -> Result<GpuLinear> {
        self.bias = bias.map(|b| gpu.upload(b)).transpose()?;
        Ok(self)
    }

    pub fn out_features(&self) -> usize {
        self.rows
    }

    pub fn in_features(&self) -> usize {
        self.cols
    }

    pub fn is_float(&self) -> bool {
        matches!(self.form, Form::Dense(_))
    }

    /// Up to how many rows a decode step through this layer can be captured in a CUDA
    /// graph: where it runs our own kernels only (cuBLAS and candle may allocate while they
    /// run).
    pub fn graph_rows(&self) -> usize {
        match &self.form {
            Form::Affine { int: true, .. } => DEQUANT_MIN_ROWS - 1,
            Form::Affine { int: false, .. } => GEMV_MAX_ROWS,
            Form::Dense(Floats::F16(_) | Floats::BF16(_)) if self.cols.is_multiple_of(8) => {
                self.gemv_rows()
            }
            Form::Dense(_) | Form::Ggml(_) => 0,
        }
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self.form, Form::Dense(Floats::BF16(_)))
    }

    pub fn nbytes(&self) -> usize {
        match &self.form {
            Form::Dense(w) => w.nbytes(),
            Form::Affine {
                packed,
                scales,
                biases,
                ..
            } => packed.len() * 4 + scales.nbytes() + biases.nbytes(),
            Form::Ggml(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Form::Ggml(_) => 0,
        }
    }

    /// `out: [m, rows]` ← `x: [m, cols]` · Wᵀ (+ bias).
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuBuf,
        m: usize,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let (n, k) = (self.rows, self.cols);
        check_input(x, m, k)?;
        out.resize(gpu, m * n)?;
        if m == 0 {
            return Ok(());
        }
        match &self.form {
            // The block GEMVs, and the quantized GEMM: one path with q/k/v and gate/up.
            _ if self.is_int() || (m <= self.gemv_rows() && self.block_gemv().is_some()) => {
                return GpuLinear::forward_all(gpu, &[self], x, m, &mut [out], scratch);
            }
            Form::Dense(w) => {
                let precision = match w {
                    Floats::F32(_) => Precision::F32,
                    Floats::F16(_) => Precision::F16,
                    Floats::BF16(_) => Precision::BF16,
                };
                gemm(gpu, (w.arg(gpu), precision), x, m, (n, k), out, scratch)?;
            }
            Form::Affine {
                packed,
                scales,
                biases,
                group_size,
                gemv,
                gemm: dequant,
                ..
            } => {
                let args = [ptr(packed, gpu.stream()), scales.arg(gpu), biases.arg(gpu)];
                if m <= GEMV_MAX_ROWS {
                    // MLX's layout: 4 warps of 2 rows each per block (kernels.cu,
                    // GEMV_WARPS, GEMV_ROWS).
                    gpu.launch(
                        gemv,
                        ((n.div_ceil(8)) as u32, 1),
                        128,
                        &[
                            args[0],
                            args[1],
                            args[2],
                            x.arg(gpu)?,
                            out.arg(gpu)?,
                            Arg::I32(n as i32),
                            Arg::I32(k as i32),
                            Arg::I32(*group_size as i32),
                            Arg::I32(m as i32),
                        ],
                    )?;
                } else {
                    let dense = grown(gpu, &mut scratch.dense, n * k)?;
                    gpu.launch(
                        dequant,
                        Gpu::grid_for(n * k / 32),
                        256,
                        &[
                            args[0],
                            args[1],
                            args[2],
                            ptr(dense, gpu.stream()),
                            Arg::I32(n as i32),
                            Arg::I32(k as i32),
                            Arg::I32(*group_size as i32),
                        ],
                    )?;
                    let dense = ptr(dense, gpu.stream());
                    gemm(gpu, (dense, Precision::Tf32), x, m, (n, k), out, scratch)?;
                }
            }
            Form::Ggml(q) => {
                let device = gpu.candle_device();
                let candle_core::Device::Cuda(cuda) = &device else {
                    return Err(Error::Internal("a GPU without a CUDA device".into()));
                };
                let xs = gpu
                    .stream()
                    .clone_dtod(&x.slice()?.slice(..m * k))
                    .map_err(|e| device_error("copying on the GPU", e))?;
                let xs = Tensor::from_storage(
                    Storage::Cuda(CudaStorage::wrap_cuda_slice(xs, cuda.clone())),
                    (m, k),
                    BackpropOp::none(),
                    false,
                );
                let y = candle_core::Module::forward(q, &xs)?.contiguous()?;
                let (storage, layout) = y.storage_and_layout();
                let Storage::Cuda(s) = &*storage else {
                    return Err(Error::Internal("candle's GPU product left the GPU".into()));
                };
                let src = s.as_cuda_slice::<f32>()?;
                let src = src.slice(layout.start_offset()..layout.start_offset() + m * n);
                let mut dst = out.slice_mut()?.slice_mut(..m * n);
                gpu.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| device_error("copying on the GPU", e))?;
            }
        }
        self.add_bias(gpu, m, out)
    }

    /// `out: [m, rows]` ← the quantized GEMM of `xq`, the input cast by [`to_quads`]
    /// (codes in the integer layout only; no bias).
    fn affine_mma(
        &self,
        gpu: &Gpu,
        xq: Arg,
        m: usize,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let Form::Affine {
            packed,
            scales,
            biases,
            group_size,
            int: true,
            gemm,
            ..
        } = &self.form
        else {
            return Err(Error::Internal(format!(
                "{self:?} through the quantized GEMM"
            )));
        };
        let (n, spans) = (self.rows, (self.cols / 32).div_ceil(AM_SPAN));
        out.resize(gpu, m * n)?;
        // Input rows a block: tiles of 16, as few as cover a small batch.
        let tiles = match m {
            ..=16 => 1,
            17..=32 => 2,
            _ => AM_M / 16,
        };
        // Where the blocks are fewer than the GPU's multiprocessors (narrow matrices), k is
        // split into parts (of at least two spans) for about two blocks a multiprocessor,
        // written apart and added up: measured best on the H200 (`benches/gpu_kernels.py`).
        let blocks = m.div_ceil(16 * tiles) * n.div_ceil(AM_ROWS);
        let parts = if blocks >= gpu.sms() {
            1
        } else {
            (2 * gpu.sms())
                .div_ceil(blocks)
                .clamp(1, (spans / 2).max(1))
        };
        let split = spans.div_ceil(parts);
        let parts = spans.div_ceil(split);
        let y = if parts == 1 {
            out.arg(gpu)?
        } else {
            ptr(grown(gpu, &mut scratch.parts, parts * m * n)?, gpu.stream())
        };
        gpu.launch(
            &format!("{gemm}_t{tiles}"),
            (
                m.div_ceil(16 * tiles) as u32,
                n.div_ceil(AM_ROWS) as u32,
                parts as u32,
            ),
            AM_THREADS,
            &[
                ptr(packed, gpu.stream()),
                scales.arg(gpu),
                biases.arg(gpu),
                y,
                Arg::I32(n as i32),
                xq,
                Arg::I32(self.cols as i32),
                Arg::I32(*group_size as i32),
                Arg::I32(m as i32),
                Arg::I32(split as i32),
            ],
        )?;
        if parts > 1 {
            gpu.launch(
                "sum_parts",
                Gpu::grid_for(m * n),
                256,
                &[
                    y,
                    out.arg(gpu)?,
                    Arg::I64((m * n) as i64),
                    Arg::I32(parts as i32),
                ],
            )?;
        }
        Ok(())
    }

    /// `out: [m, rows]` ← `xh`, the input cast to bf16, times the weights dequantized to
    /// bf16 a slice of rows at a time, each slice's product by cuBLAS (codes in the integer
    /// layout only; no bias).
    fn dequant_gemm(
        &self,
        gpu: &Gpu,
        xh: Arg,
        m: usize,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        use cublas_sys::cublasComputeType_t as C;
        use cublas_sys::cudaDataType_t as T;
        let Form::Affine {
            packed,
            scales,
            biases,
            group_size,
            bits,
            int: true,
            ..
        } = &self.form
        else {
            return Err(Error::Internal(format!("{self:?} dequantized to bf16")));
        };
        let (n, k) = (self.rows, self.cols);
        out.resize(gpu, m * n)?;
        let Arg::Ptr(y) = out.arg(gpu)? else {
            return Err(Error::Internal("a GPU buffer without an address".into()));
        };
        let slice = (DEQUANT_SLICE_BYTES / (2 * k)).clamp(1, n);
        let wide = ptr(grown(gpu, &mut scratch.wide, slice * k)?, gpu.stream());
        let kernel = format!("int_dequant_{bits}_{}", scales.suffix());
        for r0 in (0..n).step_by(slice) {
            let rows = slice.min(n - r0);
            gpu.launch(
                &kernel,
                Gpu::grid_for(rows * k / 32),
                256,
                &[
                    ptr(packed, gpu.stream()),
                    scales.arg(gpu),
                    biases.arg(gpu),
                    wide,
                    Arg::I32(r0 as i32),
                    Arg::I32(rows as i32),
                    Arg::I32(k as i32),
                    Arg::I32(*group_size as i32),
                ],
            )?;
            // Columns r0.. of every output row: ldc = n, 4 bytes a value.
            let y = Arg::Ptr(y + 4 * r0 as u64);
            blas_gemm(
                gpu,
                (wide, xh, y),
                (T::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F),
                (rows, m, k),
                n,
            )?;
        }
        Ok(())
    }

    /// Whether this layer runs the quantized GEMM above [`GEMV_MAX_ROWS`] rows.
    fn is_int(&self) -> bool {
        matches!(self.form, Form::Affine { int: true, .. })
    }

    /// `out += bias`, row by row of `m`.
    fn add_bias(&self, gpu: &Gpu, m: usize, out: &mut GpuBuf) -> Result<()> {
        let Some(b) = &self.bias else {
            return Ok(());
        };
        gpu.launch(
            "add_bias_f32",
            Gpu::grid_for(m * self.rows),
            256,
            &[
                out.arg(gpu)?,
                ptr(b, gpu.stream()),
                Arg::I64(m as i64),
                Arg::I32(self.rows as i32),
            ],
        )
    }

    /// The block GEMV this layer runs for up to `gemv_rows()` rows, if it has one
    /// (half matrices, and affine codes in the integer layout): its kernel's name without
    /// the `_m{rows}` suffix, and whether it reads the input rounded to q8.
    fn block_gemv(&self) -> Option<(&str, bool)> {
        match &self.form {
            Form::Dense(Floats::BF16(_)) if self.cols.is_multiple_of(8) => {
                Some(("dense_gemv_bf16", false))
            }
            Form::Dense(Floats::F16(_)) if self.cols.is_multiple_of(8) => {
                Some(("dense_gemv_f16", false))
            }
            Form::Affine {
                int: true, gemv, ..
            } => Some((gemv.as_str(), true)),
            _ => None,
        }
    }

    /// Rows up to which this layer runs its block GEMV (if it has one).
    fn gemv_rows(&self) -> usize {
        if self.is_bf16() {
            BF16_GEMV_MAX_ROWS
        } else {
            GEMV_MAX_ROWS
        }
    }

    /// Values per affine group (0 for other forms).
    fn group_size(&self) -> usize {
        match &self.form {
            Form::Affine { group_size, .. } => *group_size,
            _ => 0,
        }
    }

    /// Whether one block-GEMV launch can serve `self` and `other` together: the same
    /// kernel, input width and group size.
    fn fuses_with(&self, other: &GpuLinear) -> bool {
        self.block_gemv().is_some()
            && self.block_gemv() == other.block_gemv()
            && self.cols == other.cols
            && self.group_size() == other.group_size()
    }

    /// `outs[i]: [m, rows_i]` ← `x: [m, cols]` · W_iᵀ (+ bias_i) for layers of one input
    /// (q/k/v, gate/up). Up to `gemv_rows()` rows, layers that share a block GEMV go
    /// through it together, up to three a launch (the input rounded to q8 once for all);
    /// otherwise each layer goes alone.
    pub fn forward_all(
        gpu: &Gpu,
        layers: &[&GpuLinear],
        x: &GpuBuf,
        m: usize,
        outs: &mut [&mut GpuBuf],
        scratch: &mut Scratch,
    ) -> Result<()> {
        let Some(first) = layers.first() else {
            return Ok(());
        };
        let k = first.cols;
        check_input(x, m, k)?;
        if m > GEMV_MAX_ROWS && layers.iter().all(|l| l.is_int() && l.cols == k) {
            if m >= DEQUANT_MIN_ROWS {
                // bf16 tensor cores, the input cast once for all.
                let xh = to_half(gpu, x, m * k, Precision::BF16, scratch)?;
                for (l, out) in layers.iter().zip(outs.iter_mut()) {
                    l.dequant_gemm(gpu, xh, m, out, scratch)?;
                    l.add_bias(gpu, m, out)?;
                }
            } else {
                // The quantized GEMM, the input cast once for all.
                let xq = to_quads(gpu, x, (m, k), scratch)?;
                for (l, out) in layers.iter().zip(outs.iter_mut()) {
                    l.affine_mma(gpu, xq, m, out, scratch)?;
                    l.add_bias(gpu, m, out)?;
                }
            }
            return Ok(());
        }
        let together = m > 0
            && m <= first.gemv_rows()
            && layers.len() <= GEMV_MATRICES
            && layers.iter().all(|l| first.fuses_with(l));
        if !together {
            for (l, out) in layers.iter().zip(outs.iter_mut()) {
                l.forward(gpu, x, m, out, scratch)?;
            }
            return Ok(());
        }
        let Some((kernel, q8)) = first.block_gemv() else {
            return Err(Error::Internal("a block GEMV without its kernel".into()));
        };
        // Each matrix's arguments, then null ones up to three.
        let mut args = Vec::with_capacity(24);
        let mut blocks = 0;
        for (l, out) in layers.iter().zip(outs.iter_mut()) {
            out.resize(gpu, m * l.rows)?;
            blocks += l.rows.div_ceil(if q8 { BG_ROWS } else { DG_ROWS });
            match &l.form {
                Form::Dense(w) => args.push(w.arg(gpu)),
                Form::Affine {
                    packed,
                    scales,
                    biases,
                    ..
                } => args.extend([ptr(packed, gpu.stream()), scales.arg(gpu), biases.arg(gpu)]),
                Form::Ggml(_) => return Err(Error::Internal("a GGML block GEMV".into())),
            }
            args.extend([out.arg(gpu)?, Arg::I32(l.rows as i32)]);
        }
        let per_matrix = if q8 { 5 } else { 3 };
        for _ in layers.len()..GEMV_MATRICES {
            args.extend(std::iter::repeat_n(Arg::Ptr(0), per_matrix - 1));
            args.push(Arg::I32(0));
        }
        if q8 {
            let group = first.group_size() as i32;
            args.extend(quantize_q8(gpu, x, (m, k), scratch)?);
            args.extend([Arg::I32(k as i32), Arg::I32(group)]);
        } else {
            args.extend([x.arg(gpu)?, Arg::I32(k as i32)]);
        }
        args.push(Arg::I32(m as i32));
        let name = format!("{kernel}_m{}", m.next_power_of_two());
        gpu.launch(&name, (blocks as u32, 1), BG_THREADS, &args)?;
        for (l, out) in layers.iter().zip(outs.iter_mut()) {
            l.add_bias(gpu, m, out)?;
        }
        Ok(())
    }
}

/// A token (or position) embedding table `[rows, cols]` on the GPU: a step gathers its rows
/// there (kernels.cu `embed_affine_*`, `gather_rows_*` for floats) instead of dequantizing
/// them on the host and copying them up.
pub struct GpuEmbedding {
    form: EmbeddingForm,
    rows: usize,
    cols: usize,
}

enum EmbeddingForm {
    Dense(Floats),
    /// Affine groups in MLX's layout (any width: the gather reads each row once).
    Affine {
        bits: u32,
        group_size: usize,
        packed: CudaSlice<u32>,
        scales: Floats,
        biases: Floats,
    },
}

impl std::fmt::Debug for GpuEmbedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuEmbedding({}x{})", self.rows, self.cols)
    }
}

impl GpuEmbedding {
    /// A float table `[rows, cols]`, in the narrowest type that holds its values exactly.
    pub fn dense(gpu: &Gpu, values: &[f32], rows: usize, cols: usize) -> Result<GpuEmbedding> {
        Ok(GpuEmbedding {
            form: EmbeddingForm::Dense(Floats::exact(gpu, values)?),
            rows,
            cols,
        })
    }

    /// A table of affine groups in our CPU kernels' layout, in MLX's for the GPU's.
    pub fn packed(gpu: &Gpu, p: &PackedMatrix) -> Result<GpuEmbedding> {
        let a = p.to_affine()?;
        Ok(GpuEmbedding {
            form: EmbeddingForm::Affine {
                bits: a.bits,
                group_size: a.group_size,
                packed: gpu.upload(&a.packed)?,
                scales: Floats::stored(gpu, &a.scales, a.scale_dtype)?,
                biases: Floats::stored(gpu, &a.biases, a.scale_dtype)?,
            },
            rows: a.rows,
            cols: a.cols,
        })
    }

    /// Bytes the table takes on the GPU.
    pub fn nbytes(&self) -> usize {
        match &self.form {
            EmbeddingForm::Dense(w) => w.nbytes(),
            EmbeddingForm::Affine {
                packed,
                scales,
                biases,
                ..
            } => packed.len() * 4 + scales.nbytes() + biases.nbytes(),
        }
    }

    /// `out: [ids.len(), width]` ← the rows `ids` (each below `rows`: the decoder checks).
    pub fn gather(&self, gpu: &Gpu, ids: &[u32], width: usize, out: &mut GpuBuf) -> Result<()> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            return Err(Error::Internal(format!(
                "row {bad} of a {}-row embedding",
                self.rows
            )));
        }
        if width != self.cols {
            return Err(Error::Internal(format!(
                "{width} values a row from an embedding of {}",
                self.cols
            )));
        }
        let (n, k) = (ids.len(), self.cols);
        out.resize(gpu, n * k)?;
        let idx = gpu.upload(ids)?;
        let (idx, o) = (ptr(&idx, gpu.stream()), out.arg(gpu)?);
        match &self.form {
            EmbeddingForm::Dense(w) => gpu.launch(
                &format!("gather_rows_{}", w.suffix()),
                Gpu::grid_for(n * k),
                256,
                &[w.arg(gpu), idx, Arg::I32(k as i32), o, Arg::I32(n as i32)],
            ),
            EmbeddingForm::Affine {
                bits,
                group_size,
                packed,
                scales,
                biases,
            } => gpu.launch(
                &format!("embed_affine_{bits}_{}", scales.suffix()),
                Gpu::grid_for(n * k / 32),
                256,
                &[
                    ptr(packed, gpu.stream()),
                    scales.arg(gpu),
                    biases.arg(gpu),
                    idx,
                    o,
                    Arg::I32(n as i32),
                    Arg::I32(k as i32),
                    Arg::I32(*group_size as i32),
                ],
            ),
        }
    }
}

/// That `x` holds `m` rows of a layer's `k` inputs.
fn check_input(x: &GpuBuf, m: usize, k: usize) -> Result<()> {
    if x.len() == m * k {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "linear layer of input size {k} applied to {} values in {m} rows",
        x.len()
    )))
}

/// `x: [m, k]` rounded to int8 per block of 32 into `scratch` (kernels.cu `quantize_q8`):
/// the codes, and per block its scale and sum.
fn quantize_q8(
    gpu: &Gpu,
    x: &GpuBuf,
    (m, k): (usize, usize),
    scratch: &mut Scratch,
) -> Result<[Arg; 2]> {
    let (blocks, values) = (m * k / 32, m * k);
    let written = scratch.q8_of.take();
    let codes = ptr(grown(gpu, &mut scratch.q8, values)?, gpu.stream());
    let pairs = ptr(grown(gpu, &mut scratch.q8_ds, values / 16)?, gpu.stream());
    if let (Some((launch, p, len, at)), Arg::Ptr(xp), Arg::Ptr(now)) = (written, x.arg(gpu)?, codes)
    {
        if launch == gpu.launches() && p == xp && len == values && at == now {
            return Ok([codes, pairs]); // the kernel that computed `x` rounded it too
        }
    }
    // One warp per block of 32 values.
    gpu.launch(
        "quantize_q8",
        (blocks.div_ceil(8) as u32, 1),
        256,
        &[x.arg(gpu)?, codes, pairs, Arg::I64(blocks as i64)],
    )?;
    Ok([codes, pairs])
}

/// `x: [m, k]` cast to bf16 for the quantized GEMM, each quad of values reordered (kernels.cu
/// `cast_f32_bf16_quads`), into `scratch`. The buffer holds whole blocks of the GEMM's input
/// rows, which it reads (the products of rows past `m` are not written).
fn to_quads(gpu: &Gpu, x: &GpuBuf, (m, k): (usize, usize), scratch: &mut Scratch) -> Result<Arg> {
    let quads = ptr(
        grown(gpu, &mut scratch.quads, m.next_multiple_of(AM_M) * k)?,
        gpu.stream(),
    );
    gpu.launch(
        "cast_f32_bf16_quads",
        Gpu::grid_for(m * k / 4),
        256,
        &[x.arg(gpu)?, quads, Arg::I64((m * k / 4) as i64)],
    )?;
    Ok(quads)
}

/// How a cuBLAS product reads its operands: the weight's element type, and for f32
/// weights whether the tensor cores may round them to TF32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    /// f32 products (float checkpoints stored as f32: the reference models).
    F32,
    /// f32 operands on TF32 tensor cores (matrices expanded from affine groups).
    Tf32,
    /// The input is cast to the weight's half type; products accumulate in f32.
    F16,
    BF16,
}

/// `out: [m, n]` ← `x: [m, k]` · `w: [n, k]`ᵀ by cuBLAS, accumulating in f32.
fn gemm(
    gpu: &Gpu,
    (w, precision): (Arg, Precision),
    x: &GpuBuf,
    m: usize,
    (n, k): (usize, usize),
    out: &mut GpuBuf,
    scratch: &mut Scratch,
) -> Result<()> {
    use cublas_sys::cublasComputeType_t as C;
    use cublas_sys::cudaDataType_t as T;
    let (x, types) = match precision {
        Precision::F32 => (x.arg(gpu)?, (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F)),
        Precision::Tf32 => (
            x.arg(gpu)?,
            (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_TF32),
        ),
        Precision::F16 => (
            to_half(gpu, x, m * k, precision, scratch)?,
            (T::CUDA_R_16F, C::CUBLAS_COMPUTE_32F),
        ),
        Precision::BF16 => (
            to_half(gpu, x, m * k, precision, scratch)?,
            (T::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F),
        ),
    };
    blas_gemm(gpu, (w, x, out.arg(gpu)?), types, (n, m, k), n)
}

/// The first `len` values of `x` cast to f16 or bf16 (`precision`), in `scratch.half`.
fn to_half(
    gpu: &Gpu,
    x: &GpuBuf,
    len: usize,
    precision: Precision,
    scratch: &mut Scratch,
) -> Result<Arg> {
    let half = ptr(grown(gpu, &mut scratch.half, len)?, gpu.stream());
    let kernel = if precision == Precision::BF16 {
        "cast_f32_bf16"
    } else {
        "cast_f32_f16"
    };
    gpu.launch(
        kernel,
        Gpu::grid_for(len),
        256,
        &[x.arg(gpu)?, half, Arg::I64(len as i64)],
    )?;
    Ok(half)
}

/// `y: [m, ldc]`, its first `n` columns ← `x: [m, k]` · `w: [n, k]`ᵀ by cuBLAS, operands of
/// `dtype`, f32 out. In cuBLAS's column-major terms: `yᵀ [n, m] = w · xᵀ`, `w` read
/// transposed.
fn blas_gemm(
    gpu: &Gpu,
    (w, x, y): (Arg, Arg, Arg),
    (dtype, compute): (cublas_sys::cudaDataType_t, cublas_sys::cublasComputeType_t),
    (n, m, k): (usize, usize, usize),
    ldc: usize,
) -> Result<()> {
    let (Arg::Ptr(xp), Arg::Ptr(wp), Arg::Ptr(yp)) = (x, w, y) else {
        return Err(Error::Internal("a GPU buffer without an address".into()));
    };
    let (alpha, beta) = (1f32, 0f32);
    let blas = gpu.cublas();
    // SAFETY: the three pointers are live buffers of at least n·k and m·k elements of
    // `dtype` and m·ldc f32 values, on the stream cuBLAS runs on.
    #[allow(unsafe_code)]
    unsafe {
        cublas::gemm_ex(
            *blas.handle(),
            cublas_sys::cublasOperation_t::CUBLAS_OP_T,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            (&raw const alpha).cast(),
            wp as *const std::ffi::c_void,
            dtype,
            k as i32,
            xp as *const std::ffi::c_void,
            dtype,
            k as i32,
            (&raw const beta).cast(),
            yp as *mut std::ffi::c_void,
            cublas_sys::cudaDataType_t::CUDA_R_32F,
            ldc as i32,
            compute,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| device_error("cuBLAS GEMM", e))?;
    }
    Ok(())
}
