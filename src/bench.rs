//! Timing of the engine's own kernels for `MLXAccelerator.benchmark_operation` and the
//! benchmarks: a float matmul (candle), a quantized matmul (our kernels, `quant::kernels`),
//! paged attention over one causal sequence, each with its true FLOP count and the bytes it
//! reads, and the machine's memory bandwidth (the roofline's other side).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::engine::kv::{KvDType, KvLayout, KvStorage};
use crate::error::{Error, Result};
use crate::model::attention::{attend, SeqSpan};
use crate::quant::kernels::QuantizedRows;
use crate::quant::{AffineMatrix, Isa, PackedMatrix, ScaleDType};

/// Deterministic values in [-1, 1): benchmarks need data, not randomness.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// What one run of an operation costs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Seconds for all the iterations.
    pub seconds: f64,
    /// Floating-point (or integer multiply-add) operations of one run.
    pub flops: f64,
    /// Bytes of one run's main operand (weights, cache or buffer) read from memory.
    pub bytes: f64,
}

/// Runs `operation` `iterations` times on inputs of `shape` and returns what it took.
///
/// * `matmul`, `qmatmul`: `shape` is `(m, k, n)` (or `(m, k)` for `n = k`); `[m, k] @ [k, n]`,
///   `2·m·n·k` FLOPs. `qmatmul` stores the `[n, k]` weight in our kernels' affine layout, at
///   `bits` and `group_size` when `shape` is `(m, k, n, bits, group_size)` and otherwise 4
///   bits in groups of 32 (GGUF Q4_1's); each run quantizes its activations too, as a
///   forward pass does.
/// * `attention`: `shape` is `(seq_len, heads, head_dim)`; causal self-attention over one
///   sequence of `seq_len` positions, `2·heads·head_dim·t(t+1)` FLOPs (q·k and p·v over the
///   `t(t+1)/2` visible pairs).
/// * `bandwidth`: `shape` is `(megabytes,)`; sums a buffer of that size on every thread of
///   the compute pool: the memory bandwidth a memory-bound kernel can hope for.
pub fn time_operation(operation: &str, shape: &[usize], iterations: usize) -> Result<Timing> {
    if iterations == 0 {
        return Err(Error::param("num_iterations", "must be at least 1"));
    }
    let bad_shape = |want: &str| {
        Error::param(
            "input_shape",
            format!("{shape:?} does not fit {operation}: expected {want}"),
        )
    };
    if shape.contains(&0) || shape.iter().any(|&d| d > 1 << 16) {
        return Err(bad_shape("dimensions in 1..=65536"));
    }
    let timed = |run: &dyn Fn() -> Result<()>, flops: f64, bytes: f64| -> Result<Timing> {
        run()?; // warm-up: first-touch allocations stay out of the timing
        let start = Instant::now();
        for _ in 0..iterations {
            run()?;
        }
        Ok(Timing {
            seconds: start.elapsed().as_secs_f64(),
            flops,
            bytes,
        })
    };
    let device = Device::Cpu;
    match operation {
        "matmul" => {
            let (m, k, n) = match *shape {
                [m, k] => (m, k, k),
                [m, k, n] => (m, k, n),
                _ => return Err(bad_shape("(m, k) or (m, k, n)")),
            };
            let x = Tensor::from_vec(values(m * k, 1), (m, k), &device)?;
            let wt = Tensor::from_vec(values(n * k, 2), (k, n), &device)?;
            let run = || -> Result<()> {
                std::hint::black_box(x.matmul(&wt)?);
                Ok(())
            };
            timed(&run, 2.0 * (m * n * k) as f64, (4 * n * k) as f64)
        }
        "qmatmul" => {
            let (m, k, n, bits, group) = match *shape {
                [m, k] => (m, k, k, 4, 32),
                [m, k, n] => (m, k, n, 4, 32),
                [m, k, n, bits, group] => (m, k, n, bits as u32, group),
                _ => return Err(bad_shape("(m, k), (m, k, n) or (m, k, n, bits, group_size)")),
            };
            let a = AffineMatrix::quantize(&values(n * k, 2), n, k, bits, group, ScaleDType::F16)?;
            let w = PackedMatrix::from_affine(&a);
            let x = values(m * k, 1);
            let isa = Isa::active();
            let run = || -> Result<()> {
                let q = QuantizedRows::new(&x, m, k, group);
                std::hint::black_box(w.matmul_t_on(isa, &q));
                Ok(())
            };
            timed(&run, 2.0 * (m * n * k) as f64, w.nbytes() as f64)
        }
        "bandwidth" => {
            let [megabytes] = *shape else {
                return Err(bad_shape("(megabytes,)"));
            };
            let buffer = vec![1u64; megabytes << 17];
            let run = || -> Result<()> {
                // Wide chunks, one per task; a sum per chunk keeps the loads honest.
                let total: u64 = buffer
                    .par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                    .sum();
                std::hint::black_box(total);
                Ok(())
            };
            timed(&run, 0.0, (megabytes << 20) as f64)
        }
        "attention" => {
            let [t, heads, hd] = *shape else {
                return Err(bad_shape("(seq_len, heads, head_dim)"));
            };
            let blocks: Vec<u32> = (0..t.div_ceil(16) as u32).collect();
            let layout = KvLayout {
                block_size: 16,
                kv_heads: heads,
                head_dim: hd,
                ring: None,
            };
            let kv = KvStorage::new(KvDType::F16, 1, blocks.len(), layout)?;
            let (q, k, v) = (
                values(t * heads * hd, 3),
                values(t * heads * hd, 4),
                values(t * heads * hd, 5),
            );
            let seq = [SeqSpan {
                row: 0,
                len: t,
                start: 0,
                blocks: &blocks,
                window_blocks: &[],
            }];
            let scale = 1.0 / (hd as f32).sqrt();
            let out = std::cell::RefCell::new(Vec::new());
            let run = || -> Result<()> {
                let mut out = out.borrow_mut();
                attend(&kv, 0, &seq, (&q, &k, &v), heads, scale, None, &mut out);
                std::hint::black_box(&*out);
                Ok(())
            };
            let flops = 2.0 * (heads * hd) as f64 * (t * (t + 1)) as f64;
            // The keys and values of every head (f16, as quantized models cache them).
            timed(&run, flops, (2 * heads * t * hd * 2) as f64)
        }
        other => Err(Error::param(
            "operation",
            format!("unknown operation '{other}' (matmul, qmatmul, attention, bandwidth, or a callable)"),
        )),
    }
}
