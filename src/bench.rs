//! Timing of the engine's own kernels for `MLXAccelerator.benchmark_operation`: a float
//! matmul (candle), a quantized matmul (Q4_0 weights, as GGUF models run) and paged
//! attention over one causal sequence, each with its true FLOP count.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::model::attention::{attend, KvStorage, SeqSpan};

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

/// Runs `operation` `iterations` times on inputs of `shape` and returns the seconds they
/// took and the floating-point operations of one run.
///
/// * `matmul`, `qmatmul`: `shape` is `(m, k, n)` (or `(m, k)` for `n = k`); `[m, k] @ [k, n]`,
///   `2·m·n·k` FLOPs. `qmatmul` stores the `[n, k]` weight as Q4_0 (`k` a multiple of 32).
/// * `attention`: `shape` is `(seq_len, heads, head_dim)`; causal self-attention over one
///   sequence of `seq_len` positions, `2·heads·head_dim·t(t+1)` FLOPs (q·k and p·v over the
///   `t(t+1)/2` visible pairs).
pub fn time_operation(operation: &str, shape: &[usize], iterations: usize) -> Result<(f64, f64)> {
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
    let device = Device::Cpu;
    match operation {
        "matmul" | "qmatmul" => {
            let (m, k, n) = match *shape {
                [m, k] => (m, k, k),
                [m, k, n] => (m, k, n),
                _ => return Err(bad_shape("(m, k) or (m, k, n)")),
            };
            let x = Tensor::from_vec(values(m * k, 1), (m, k), &device)?;
            let w = Tensor::from_vec(values(n * k, 2), (n, k), &device)?;
            let run: Box<dyn Fn() -> Result<Tensor>> = if operation == "matmul" {
                let wt = w.t()?.contiguous()?; // [k, n]
                Box::new(move || Ok(x.matmul(&wt)?))
            } else {
                if k % 32 != 0 {
                    return Err(bad_shape("k a multiple of 32 (Q4_0 blocks)"));
                }
                let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0)?)?;
                Box::new(move || Ok(q.forward(&x)?))
            };
            run()?; // warm-up: first-touch allocations stay out of the timing
            let start = Instant::now();
            for _ in 0..iterations {
                run()?;
            }
            Ok((start.elapsed().as_secs_f64(), 2.0 * (m * n * k) as f64))
        }
        "attention" => {
            let [t, heads, hd] = *shape else {
                return Err(bad_shape("(seq_len, heads, head_dim)"));
            };
            let blocks: Vec<u32> = (0..t.div_ceil(16) as u32).collect();
            let kv = KvStorage::new(1, blocks.len(), 16, heads, hd, None)?;
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
            }];
            let scale = 1.0 / (hd as f32).sqrt();
            attend(&kv, 0, &seq, &q, &k, &v, heads, scale, None);
            let start = Instant::now();
            for _ in 0..iterations {
                std::hint::black_box(attend(&kv, 0, &seq, &q, &k, &v, heads, scale, None));
            }
            let flops = 2.0 * (heads * hd) as f64 * (t * (t + 1)) as f64;
            Ok((start.elapsed().as_secs_f64(), flops))
        }
        other => Err(Error::param(
            "operation",
            format!("unknown operation '{other}' (matmul, qmatmul, attention, or a callable)"),
        )),
    }
}
