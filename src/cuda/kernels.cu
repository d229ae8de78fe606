// Cortex's CUDA kernels: the decoder's operations on the GPU (src/cuda/ops.rs launches
// them). Compiled to compute_80 PTX at build time (build.rs), so they run on any sm_80+
// GPU. Activations are row-major f32 `[rows, width]`; the KV cache is f16 or bf16 in
// blocks `[num_blocks, kv_heads, block_size, head_dim]` for keys and values alike (one
// key is contiguous, so a warp reads it in one coalesced load).
//
// Every kernel computes what the CPU backend computes, in the same order where it matters
// (RoPE angles in double, attention over the same visible positions, keys rounded to the
// cache's type before a query reads them), so the CPU f32 path is the GPU's reference.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32

// Programmatic dependent launch (sm_90 and later; mod.rs launches every kernel with it where
// the GPU has it, from the PTX built for compute_90): a kernel may be scheduled while the one
// before it still runs. PDL_WAIT holds it until that kernel has finished and its writes are
// visible, so a kernel calls it before it reads anything another kernel wrote (the GEMVs
// start loading their weights first); PDL_NEXT lets the next kernel be scheduled, to wait in
// turn. Elsewhere both are no-ops and launches are ordered as usual.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_NEXT() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT()
#define PDL_NEXT()
#endif
#define PDL_ENTER() \
  PDL_WAIT();       \
  PDL_NEXT()

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024).
__device__ float block_sum(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  x = warp_sum(x);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  const int warps = blockDim.x / WARP;
  x = lane < warps ? partial[lane] : 0.f;
  return warp_sum(x);
}

// Element types of weights, scales and the KV cache, as f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------
// Element-wise

// x += a (+ b), n elements.
extern "C" __global__ void add_f32(float* x, const float* a, const float* b, long n) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    x[i] += b ? a[i] + b[i] : a[i];
}

extern "C" __global__ void scale_f32(float* x, float s, long n) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    x[i] *= s;
}

// y[r, c] += bias[c] over `rows` rows of `cols`.
extern "C" __global__ void add_bias_f32(float* y, const float* bias, long rows, int cols) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < rows * cols; i += (long)gridDim.x * blockDim.x)
    y[i] += bias[i % cols];
}

// The CPU's formulas (layers.rs `Activation::of`).
__device__ __forceinline__ float act(int kind, float x) {
  if (kind == 0) return x / (1.f + expf(-x));  // SiLU
  const float k = 0.7978846f;                   // tanh-approximated GELU
  return 0.5f * x * (1.f + tanhf(k * x * (1.f + 0.044715f * x * x)));
}

// A block of 32 values that 8 consecutive lanes hold, 4 each (lane % 8 their place in it),
// rounded to q8 exactly as `quantize_q8` (below) rounds them: each lane's 4 codes to `xq`,
// the block's (d, d·Σxq) to `ds` from its first lane. Every lane of the warp calls it;
// `store` says whether this lane's values are real.
__device__ __forceinline__ void q8_block4(float4 v, char4* xq, float2* ds, bool store) {
  float mx = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  const float d = mx / 127.f;
  const int a = d > 0.f ? __float2int_rn(v.x / d) : 0, b = d > 0.f ? __float2int_rn(v.y / d) : 0;
  const int c = d > 0.f ? __float2int_rn(v.z / d) : 0, e = d > 0.f ? __float2int_rn(v.w / d) : 0;
  int sum = a + b + c + e;
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  if (!store) return;
  *xq = make_char4(a, b, c, e);
  if (threadIdx.x % 8 == 0) *ds = make_float2(d, d * (float)sum);
}

// gate = act(gate) * up (up == NULL: gate = act(gate)), thread t taking elements 4t..4t+3;
// with `xq`, the result is also rounded to q8 there and in `ds` (`n` a multiple of 32): the
// next projection's input, without a launch of `quantize_q8`.
extern "C" __global__ void activation_f32(float* gate, const float* up, int kind, long n, int8_t* xq,
                                          float2* ds) {
  PDL_ENTER();
  const long n4 = (n + 3) / 4;
  // The bound is the block's, so a warp's lanes go round together (q8_block4 shuffles).
  for (long first = blockIdx.x * (long)blockDim.x; first < n4; first += (long)gridDim.x * blockDim.x) {
    const long t = first + threadIdx.x;
    float r[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const long i = 4 * t + e;
      r[e] = 0.f;
      if (i < n) {
        const float a = act(kind, gate[i]);
        r[e] = up ? a * up[i] : a;
        gate[i] = r[e];
      }
    }
    if (xq)
      q8_block4(make_float4(r[0], r[1], r[2], r[3]), reinterpret_cast<char4*>(xq) + t, ds + t / 8,
                t < n4);
  }
}

// out[i, :] = x[rows[i], :] as f32 (activations, or an embedding table of floats).
template <typename T>
__device__ void gather_rows(const T* x, const unsigned* rows, int width, float* out, int n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)n * width; i += (long)gridDim.x * blockDim.x)
    out[i] = to_f32(x[(long)rows[i / width] * width + i % width]);
}

#define GATHER_ROWS(SNAME, T)                                                                       \
  extern "C" __global__ void gather_rows_##SNAME(const T* x, const unsigned* rows, int width,       \
                                                 float* out, int n) {                               \
    PDL_ENTER();                                                                                    \
    gather_rows<T>(x, rows, width, out, n);                                                         \
  }
GATHER_ROWS(f32, float)
GATHER_ROWS(f16, __half)
GATHER_ROWS(bf16, __nv_bfloat16)

// ---- Drawing tokens where the logits are (engine/sampling.rs defines the draw) ----------------
//
// Every step below repeats sampling.rs bit for bit: penalties and the weights are IEEE
// operations rounded once each (the _rn intrinsics keep nvcc from fusing a multiply and an
// add), and every sum is of integers, so no result depends on the order threads add in.

// Words of one row's draw (cuda/mod.rs `Gpu::sample_rows` packs them): temperature (0:
// argmax), top_p, repetition, presence and frequency penalties (f32 bits), top_k (0: all),
// the row's first penalized entry and their count, min-p's floor and the draw (u64 each, low
// word first).
#define DRAW_WORDS 12
#define SAMPLE_THREADS 1024

// 2^40 · e^x for x <= 0 as sampling.rs `weight` computes it, before its rounding down: t = x ·
// log2(e), rounded to an integer n and a fraction f in [-0.5, 0.5], 2^f by Horner's rule over
// Taylor's coefficients, times 2^(n + 40) (exact). 0 for NaN, -inf and below 2^-72. The weight
// itself is this value rounded down to an integer (`as_weight`), so a row's weights fit in
// its logits' place.
__device__ __forceinline__ float weight_value(float x) {
  float t = __fmul_rn(x, __int_as_float(0x3fb8aa3b));  // std::f32::consts::LOG2_E
  if (isnan(t) || t < -72.0f) return 0.0f;
  float n = __fsub_rn(__fadd_rn(t, 12582912.0f), 12582912.0f);
  float f = __fsub_rn(t, n);
  // ln(2)^k / k! for k = 7 down to 1, as f32 bits (sampling.rs EXP2_COEFFS).
  const unsigned coeffs[7] = {0x377fe5fe, 0x39218489, 0x3aaec3ff, 0x3c1d955b,
                              0x3d635847, 0x3e75fdf0, 0x3f317218};
  float p = __int_as_float(coeffs[0]);
#pragma unroll
  for (int k = 1; k < 7; k++) p = __fadd_rn(__fmul_rn(p, f), __int_as_float(coeffs[k]));
  p = __fadd_rn(__fmul_rn(p, f), 1.0f);
  return __fmul_rn(p, __int_as_float((127 + (int)n + 40) << 23));
}

__device__ __forceinline__ unsigned long long as_weight(float value) {
  return __float2ull_rz(value);
}

// An unsigned key that orders floats as Rust's total_cmp does.
__device__ __forceinline__ unsigned order_key(float v) {
  unsigned u = __float_as_uint(v);
  return u ^ ((u >> 31) ? 0xffffffffu : 0x80000000u);
}

// Whether (v, i) beats (best, at) for an argmax: a larger value, or an equal one earlier.
__device__ __forceinline__ bool beats(float v, int i, float best, int at) {
  return v > best || (v == best && i < at);
}

// The warp's winning (best, at) by `beats`, in lane 0.
__device__ __forceinline__ void warp_argmax(float& best, int& at) {
  for (int o = WARP / 2; o > 0; o /= 2) {
    float ob = __shfl_down_sync(0xffffffff, best, o);
    int oa = __shfl_down_sync(0xffffffff, at, o);
    if (beats(ob, oa, best, at)) {
      best = ob;
      at = oa;
    }
  }
}

// The block's exclusive prefix sum of v (threads in order) and, in `total`, its sum.
__device__ unsigned long long block_scan(unsigned long long v, unsigned long long* total) {
  __shared__ unsigned long long s_warp[SAMPLE_THREADS / WARP + 1];  // and the total
  int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  unsigned long long inc = v;
  for (int o = 1; o < WARP; o *= 2) {
    unsigned long long up = __shfl_up_sync(0xffffffff, inc, o);
    if (lane >= o) inc += up;
  }
  if (lane == WARP - 1) s_warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < blockDim.x / WARP ? s_warp[lane] : 0, wi = w;
    for (int o = 1; o < WARP; o *= 2) {
      unsigned long long up = __shfl_up_sync(0xffffffff, wi, o);
      if (lane >= o) wi += up;
    }
    s_warp[lane] = wi - w;  // exclusive
    if (lane == WARP - 1) s_warp[WARP] = wi;
  }
  __syncthreads();
  unsigned long long before = s_warp[warp] + inc - v;
  *total = s_warp[WARP];
  __syncthreads();
  return before;
}

// hist[b] += v for a 64-bit histogram kept as 32-bit halves (lo, hi): shared memory adds 32-bit
// words natively, where a 64-bit add is a compare-and-swap loop that the threads of a radix
// pass, whose values share their high digits, would retry on one address for hundreds of
// µs. The low add's old value says whether it carried.
__device__ __forceinline__ void hist_add64(unsigned* lo, unsigned* hi, int b, unsigned long long v) {
  unsigned v_lo = (unsigned)v, v_hi = (unsigned)(v >> 32);
  unsigned old = atomicAdd(&lo[b], v_lo);
  v_hi += old + v_lo < old;
  if (v_hi) atomicAdd(&hi[b], v_hi);
}

// One value per lane into the histogram (bin < 0: none); a warp whose lanes all hold one
// bin adds its sum once. Every lane of the warp calls it.
__device__ __forceinline__ void warp_hist_add(unsigned* lo, unsigned* hi, int bin,
                                              unsigned long long v) {
  int first = __shfl_sync(0xffffffff, bin, 0);
  if (__all_sync(0xffffffff, bin == first)) {
    if (first < 0) return;
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    if (threadIdx.x % WARP == 0) hist_add64(lo, hi, first, v);
  } else if (bin >= 0) {
    hist_add64(lo, hi, bin, v);
  }
}

// Warp 0, over 256 bins from the highest down: the bin where the running sum of `hist`
// reaches `need`, and what of `need` is left for that bin (into s_bin, s_need).
__device__ void select_bin(const unsigned long long* hist, unsigned long long need, int* s_bin,
                           unsigned long long* s_need) {
  int lane = threadIdx.x;
  unsigned long long mine = 0;
  for (int j = 0; j < 8; j++) mine += hist[255 - 8 * lane - j];
  unsigned long long inc = mine;
  for (int o = 1; o < WARP; o *= 2) {
    unsigned long long up = __shfl_up_sync(0xffffffff, inc, o);
    if (lane >= o) inc += up;
  }
  unsigned reached = __ballot_sync(0xffffffff, inc >= need);
  int first = reached ? __ffs(reached) - 1 : WARP - 1;
  if (lane == first) {
    unsigned long long cum = inc - mine;
    int b = 255 - 8 * lane;
    for (int j = 0; j < 7 && cum + hist[b] < need; j++, b--) cum += hist[b];
    *s_bin = b;
    *s_need = need - cum;
  }
}

// The index where the running sum of amount(i), in index order, first reaches `need` (each
// thread sums a contiguous run of indices, then one block scan places the runs); `width`
// when it never does.
template <typename F>
__device__ int find_nth(int width, unsigned long long need, F amount) {
  __shared__ int s_at;
  // An odd run, so that a warp's threads reading a row in shared memory hit distinct banks.
  int run = ((width + blockDim.x - 1) / blockDim.x) | 1;
  int lo = min((int)threadIdx.x * run, width), hi = min(lo + run, width);
  unsigned long long mine = 0, total;
  for (int i = lo; i < hi; i++) mine += amount(i);
  if (threadIdx.x == 0) s_at = width;
  unsigned long long before = block_scan(mine, &total);
  if (before < need && before + mine >= need) {
    unsigned long long cum = before;
    for (int i = lo; i < hi; i++) {
      cum += amount(i);
      if (cum >= need) {
        s_at = i;
        break;
      }
    }
  }
  __syncthreads();
  return s_at;
}

// out[r] = the token row r of `logits: [rows, width]` draws (sampling.rs `Sampler::sample`),
// 0xFFFFFFFF when the row holds a NaN. One block of 1024 threads a row. The row's penalties
// are applied in place; then its argmax (temperature 0 stops there); top-k's set (a radix
// select over the logits' order keys, the first indices among equals); the weights, over the
// logits; top-p's run (a radix select over the weights, by weight); min-p's floor; and the
// token where the running weight passes draw · mass / 2^64. With `in_shared`, the row is
// worked on in dynamic shared memory (width floats), else in place. `draws` null: argmaxes.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
    float* logits, int width, const unsigned* draws, const unsigned* penalized, int in_shared,
    unsigned* out) {
  PDL_ENTER();
  extern __shared__ float s_row[];
  __shared__ unsigned long long s_hist[256];
  __shared__ unsigned s_lo[256], s_hi[256];
  __shared__ float s_best[WARP];
  __shared__ int s_at[WARP];
  __shared__ int s_nan, s_bin;
  __shared__ unsigned long long s_need;
  float* x = logits + (long)blockIdx.x * width;
  // Null draws: every row takes its argmax (temperature 0, no penalties).
  const unsigned argmax_words[DRAW_WORDS] = {};
  const unsigned* d = draws ? draws + blockIdx.x * DRAW_WORDS : argmax_words;
  float temperature = __uint_as_float(d[0]), top_p = __uint_as_float(d[1]);
  float repetition = __uint_as_float(d[2]), presence = __uint_as_float(d[3]);
  float frequency = __uint_as_float(d[4]);
  unsigned top_k = d[5], pen_from = d[6], pen_count = d[7];
  unsigned long long floor_w = d[8] | (unsigned long long)d[9] << 32;
  unsigned long long draw = d[10] | (unsigned long long)d[11] << 32;
  int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;

  // Penalties (sampling.rs `apply_penalties`): entries are (token, times generated), one per
  // distinct token.
  for (unsigned e = tid; e < pen_count; e += blockDim.x) {
    unsigned t = penalized[2 * (pen_from + e)], n = penalized[2 * (pen_from + e) + 1];
    if (t >= (unsigned)width) continue;
    float l = x[t];
    if (repetition != 1.0f) l = l > 0.0f ? __fdiv_rn(l, repetition) : __fmul_rn(l, repetition);
    if (n > 0 && (presence != 0.0f || frequency != 0.0f))
      l = __fsub_rn(l, __fadd_rn(presence, __fmul_rn(frequency, __uint2float_rn(n))));
    x[t] = l;
  }
  if (tid == 0) s_nan = 0;
  __syncthreads();

  // The argmax (`at == width`: nothing seen yet, so any value, even -inf, replaces it), and
  // the row copied to where the rest reads it.
  float* row = in_shared ? s_row : x;
  float best = -INFINITY;
  int at = width;
  bool nan = false;
  for (int i = tid; i < width; i += blockDim.x) {
    float v = x[i];
    if (in_shared) s_row[i] = v;
    nan |= isnan(v);
    if (beats(v, i, best, at)) {
      best = v;
      at = i;
    }
  }
  warp_argmax(best, at);
  if (__any_sync(0xffffffff, nan) && lane == 0) s_nan = 1;
  if (lane == 0) {
    s_best[warp] = best;
    s_at[warp] = at;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < blockDim.x / WARP ? s_best[lane] : -INFINITY;
    at = lane < blockDim.x / WARP ? s_at[lane] : width;
    warp_argmax(best, at);
    if (lane == 0) {
      s_best[0] = best;
      s_at[0] = at;
    }
  }
  __syncthreads();
  best = s_best[0];
  at = s_at[0];
  if (s_nan || temperature == 0.0f) {
    if (tid == 0) out[blockIdx.x] = s_nan ? 0xFFFFFFFFu : (unsigned)at;
    return;
  }

  // Top-k: the k-th largest order key, byte by byte from the top, and how many of the
  // tokens holding it are kept (the first ones).
  unsigned k_key = 0;
  int k_cut = width;  // ties at k_key are kept up to this index
  bool cut_k = top_k > 0 && top_k < (unsigned)width;
  if (cut_k) {
    unsigned mask = 0;
    unsigned long long need = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += blockDim.x) s_lo[b] = s_hi[b] = 0;
      __syncthreads();
      for (int base = 0; base < width; base += blockDim.x) {
        int i = base + tid;
        unsigned key = i < width ? order_key(row[i]) : 0;
        bool in = i < width && (key & mask) == k_key;
        warp_hist_add(s_lo, s_hi, in ? (int)((key >> shift) & 255) : -1, 1);
      }
      __syncthreads();
      for (int b = tid; b < 256; b += blockDim.x) s_hist[b] = (unsigned long long)s_hi[b] << 32 | s_lo[b];
      __syncthreads();
      if (warp == 0) select_bin(s_hist, need, &s_bin, &s_need);
      __syncthreads();
      k_key |= (unsigned)s_bin << shift;
      mask |= 255u << shift;
      need = s_need;
      __syncthreads();
    }
    k_cut = find_nth(width, need, [&](int i) { return (unsigned long long)(order_key(row[i]) == k_key); });
  }
  // The weights of top-k's set (0 outside it), computed once, over the logits.
  unsigned long long mine = 0, total;
  for (int i = tid; i < width; i += blockDim.x) {
    float v = row[i];
    unsigned key = order_key(v);
    bool in = !cut_k || key > k_key || (key == k_key && i <= k_cut);
    row[i] = in ? weight_value(__fdiv_rn(__fsub_rn(v, best), temperature)) : 0.0f;
    mine += as_weight(row[i]);
  }
  block_scan(mine, &total);  // its barriers also publish the weights to the block
  auto w_at = [&](int i) { return as_weight(row[i]); };

  // Top-p: the weight w_p at which the heaviest weights reach ceil(top_p · total), and how
  // many of those weighing exactly w_p are kept (the first ones).
  unsigned long long w_p = 0;
  int p_cut = width;
  if (top_p < 1.0f) {
    unsigned long long target = (unsigned long long)ceil((double)top_p * (double)total);
    target = target < 1 ? 1 : target;
    if (target < total) {
      unsigned long long mask = 0, need = target;
      for (int shift = 40; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) s_lo[b] = s_hi[b] = 0;
        __syncthreads();
        for (int base = 0; base < width; base += blockDim.x) {
          int i = base + tid;
          unsigned long long wi = i < width ? w_at(i) : 0;
          bool in = wi > 0 && (wi & mask) == w_p;
          warp_hist_add(s_lo, s_hi, in ? (int)((wi >> shift) & 255) : -1, wi);
        }
        __syncthreads();
        for (int b = tid; b < 256; b += blockDim.x) s_hist[b] = (unsigned long long)s_hi[b] << 32 | s_lo[b];
        __syncthreads();
        if (warp == 0) select_bin(s_hist, need, &s_bin, &s_need);
        __syncthreads();
        w_p |= (unsigned long long)s_bin << shift;
        mask |= 255ull << shift;
        need = s_need;
        __syncthreads();
      }
      // `need` of the mass is left for the tokens weighing w_p: the first ceil(need / w_p).
      unsigned long long ties = (need + w_p - 1) / w_p;
      p_cut = find_nth(width, ties, [&](int i) { return (unsigned long long)(w_at(i) == w_p); });
    }
  }
  auto kept = [&](int i) -> unsigned long long {
    unsigned long long wi = w_at(i);
    if (wi < floor_w || wi < w_p || (wi == w_p && i > p_cut)) return 0;
    return wi;
  };

  // The draw: u = draw · mass / 2^64, and the token where the running mass passes u.
  unsigned long long mass;
  mine = 0;
  for (int i = tid; i < width; i += blockDim.x) mine += kept(i);
  block_scan(mine, &mass);
  if (mass == 0) {
    if (tid == 0) out[blockIdx.x] = (unsigned)at;
    return;
  }
  int token = find_nth(width, __umul64hi(draw, mass) + 1, kept);
  if (tid == 0) out[blockIdx.x] = (unsigned)(token < width ? token : at);
}

// out[rows[i], :] += weights[i] * y[i, :] (the rows are distinct: one expert's tokens).
extern "C" __global__ void scatter_add_rows_f32(float* out, const float* y, const unsigned* rows,
                                                const float* weights, int width, int n) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)n * width; i += (long)gridDim.x * blockDim.x)
    out[(long)rows[i / width] * width + i % width] += weights[i / width] * y[i];
}

extern "C" __global__ void cast_f32_bf16(const float* x, __nv_bfloat16* y, long n) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_f32_f16(const float* x, __half* y, long n) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

// ---------------------------------------------------------------------------------------
// Norms: one block per row of `d` (layers.rs `Norm::apply`: x / sqrt(mean(x²) + eps) · w,
// or LayerNorm when `bias` is given): out = norm(x), after x += a (+ b) when `a` is given
// (a residual add and the norm that reads it, in one pass). `out` may be `x`. `d` is a
// multiple of 4 (ops.rs); thread t keeps the float4s t, t + blockDim, ... (at most NORM_PER
// of them, ops.rs sizes the block) in registers with their weights, loaded before the
// reduction (a LayerNorm's bias after it): the row is read once and written once, and no load waits on the sum (a
// decode step's norms are single rows, where every round trip to memory shows). With `xq`,
// the output is also rounded to q8 there and in `ds` (`d` a multiple of 32), as
// `quantize_q8` would: the next projections' input, without a launch of their own.
#define NORM_PER 4

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

extern "C" __global__ void __launch_bounds__(1024) norm_f32(float* x, const float* a, const float* b,
                                                            float* out, const float* w,
                                                            const float* bias, float eps, int d,
                                                            int8_t* xq, float2* ds) {
  PDL_ENTER();
  const long off = (long)blockIdx.x * d;
  float4* x4 = reinterpret_cast<float4*>(x + off);
  const int n4 = d / 4;
  float4 v[NORM_PER], wv[NORM_PER];
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < NORM_PER; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = wv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < n4) {
      float4 t = x4[i];
      wv[j] = reinterpret_cast<const float4*>(w)[i];
      if (a) {
        t = add4(t, reinterpret_cast<const float4*>(a + off)[i]);
        if (b) t = add4(t, reinterpret_cast<const float4*>(b + off)[i]);
        x4[i] = t;
      }
      v[j] = t;
      s += bias ? t.x + t.y + t.z + t.w : t.x * t.x + t.y * t.y + t.z * t.z + t.w * t.w;
    }
  }
  // As the CPU rounds: (x - mean) / std · w + bias, with mean 0 and bias 0 for RMSNorm.
  float mean = 0.f, std;
  if (!bias) {
    std = sqrtf(block_sum(s) / d + eps);
  } else {
    mean = block_sum(s) / d;
    float var = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_PER; j++)
      if (threadIdx.x + j * blockDim.x < n4) {
        const float4 t = v[j];
        var += (t.x - mean) * (t.x - mean) + (t.y - mean) * (t.y - mean) + (t.z - mean) * (t.z - mean) +
               (t.w - mean) * (t.w - mean);
      }
    std = sqrtf(block_sum(var) / d + eps);
  }
  float4* o4 = reinterpret_cast<float4*>(out + off);
#pragma unroll
  for (int j = 0; j < NORM_PER; j++) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < n4) {
      const float4 t = v[j], g = wv[j];
      const float4 c = bias ? reinterpret_cast<const float4*>(bias)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
      v[j] = make_float4((t.x - mean) / std * g.x + c.x, (t.y - mean) / std * g.y + c.y,
                         (t.z - mean) / std * g.z + c.z, (t.w - mean) / std * g.w + c.w);
      o4[i] = v[j];
    }
    if (xq) {
      const long f = (long)blockIdx.x * n4 + i;  // the float4's index in [rows, d]
      q8_block4(v[j], reinterpret_cast<char4*>(xq) + f, ds + f / 8, i < n4);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The paged KV cache: where head h of the key in `slot` (its block · block_size + index in
// the block) starts, in a layer's [num_blocks, kv_heads, block_size, head_dim] (`block` is
// the table's entry for the slot).
__device__ __forceinline__ long cache_at(long block, long slot, int h, int kv_heads, int block_size,
                                         int head_dim) {
  return ((block * kv_heads + h) * block_size + slot % block_size) * head_dim;
}

// ---------------------------------------------------------------------------------------
// RoPE (layers.rs `Rope::rotate`) on the queries q: [rows, heads, head_dim] and the keys
// k: [rows, kv_heads, head_dim], row r at positions[r]. One thread per (row, head, pair of
// dimensions), the queries' heads first: a query's rotated pairs (i < half), a key's
// head_dim / 2 pairs, those past the rotated ones (partial rotary) left as they are. The
// angle is taken in double, as on the CPU, so long contexts stay accurate.
//
// With `cache_k`, each key thread also writes its two dimensions of the rotated key and of
// the value v: [rows, kv_heads, head_dim] into the cache at `slots[row]` (as `kv_store`,
// below): the store costs no launch of its own. ops.rs asks for it only where no row of the
// pass reads a slot another row overwrites (a ring that wraps within a chunk of a prompt).
template <typename T>
__device__ void rope(float* q, float* k, const int* positions, const float* inv_freq, int half_,
                     int heads, int kv_heads, int head_dim, int interleaved, float scale, int rows,
                     const float* v, T* cache_k, T* cache_v, const long* slots, int block_size) {
  const int pairs = head_dim / 2;
  const long nq = (long)rows * heads * half_, n = nq + (long)rows * kv_heads * pairs;
  for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
    const bool is_q = t < nq;
    const long e = is_q ? t : t - nq;  // the pair within q or k
    const int per = is_q ? half_ : pairs;
    const int i = e % per;
    const long rh = e / per;
    const int row = rh / (is_q ? heads : kv_heads);
    float* head = (is_q ? q : k) + rh * head_dim;
    int a, b;
    if (i < half_) {
      double s, c;
      sincos((double)positions[row] * (double)inv_freq[i], &s, &c);
      const float cs = (float)c * scale, sn = (float)s * scale;
      a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half_;
      const float u = head[a], w = head[b];
      head[a] = u * cs - w * sn;
      head[b] = u * sn + w * cs;
    } else {
      a = 2 * i, b = 2 * i + 1;  // past the rotated dimensions (2·half of them)
    }
    if (is_q || !cache_k) continue;
    const long slot = slots[row];
    if (slot < 0) continue;
    const long dst = cache_at(slot / block_size, slot, rh % kv_heads, kv_heads, block_size, head_dim);
    const float* vh = v + rh * head_dim;
    cache_k[dst + a] = from_f32<T>(head[a]);
    cache_k[dst + b] = from_f32<T>(head[b]);
    cache_v[dst + a] = from_f32<T>(vh[a]);
    cache_v[dst + b] = from_f32<T>(vh[b]);
  }
}

#define ROPE(NAME, T)                                                                              \
  extern "C" __global__ void NAME(float* q, float* k, const int* positions, const float* inv_freq, \
                                  int half_, int heads, int kv_heads, int head_dim, int interleaved, \
                                  float scale, int rows, const float* v, T* cache_k, T* cache_v,   \
                                  const long* slots, int block_size) {                             \
    PDL_ENTER();                                                                                   \
    rope<T>(q, k, positions, inv_freq, half_, heads, kv_heads, head_dim, interleaved, scale, rows, \
            v, cache_k, cache_v, slots, block_size);                                               \
  }
ROPE(rope_f16, __half)
ROPE(rope_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------
// Paged attention, flash-decoding style.
//
// Per row of the batch, `meta[row] = {qpos, start, seq_row, table_offset}`: the row's
// position, its sequence's first position in this pass, the sequence's first row, and
// where its block table starts in `tables`. A row sees positions in two ranges (the CPU's
// `attend_in`): `[first, kept_end)` (what a rotating cache keeps for good) and
// `[max(first, keep, recent), qpos]`, where `first` is the sliding window's start.
// Positions before `start` are read from the cache at their slot (Ring::slot); positions
// from `start` on from the pass's fresh k/v rows, rounded to the cache type as the CPU
// rounds them.
//
// Grid (rows, kv_heads · chunks, splits), ATT_WARPS warps; with `row_ids`, block x serves row
// row_ids[x] (the rows the prompt attention below leaves). A block serves one row, one KV
// head and up to ATT_GH of the query heads that share it (GQA: a chunk of them), so each
// key and value is read once for all of those heads; the visible keys are split into
// `splits` ranges, one a block (flash-decoding: a single decoded row still spreads over
// the GPU). A key of head_dim ≤ D is read by D/8 lanes, 8 dimensions (16 bytes) each; the
// other lanes of the warp read the next keys at once. Each such group of lanes is a
// "worker" with its own online softmax over keys worker, worker + workers, ...; the block
// merges its workers through shared memory, and with more than one split, writes its
// partial result `(max, sum, acc[head_dim])` to `parts`; the last block of the row and
// chunk to finish (a ticket from `counts`, which it resets) merges the splits.

#define ATT_WARPS 4
// Query heads a block serves.
#define ATT_GH 4
// Keys a worker has in flight at once (their loads overlap; the softmax rescales once per
// batch of them).
#define ATT_U 4
// Fewest keys a split takes (fewer would leave its block's workers idle), and most splits
// (ops.rs `ATT_MAX_SPLITS`).
#define ATT_MIN_SPLIT 32
#define ATT_MAX_SPLITS 32

struct RowMeta {
  int qpos, start, seq_row, table_offset;
};

// 8 values of type T packed in 16 bytes, to f32.
__device__ __forceinline__ void unpack8(uint4 u, __half, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void unpack8(uint4 u, __nv_bfloat16, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
// 8 f32 values rounded to T and packed (a fresh key, as the cache will hold it).
template <typename T> __device__ __forceinline__ uint4 pack8(const float* x) {
  const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  uint4 u;
  T* t = reinterpret_cast<T*>(&u);
  t[0] = from_f32<T>(a.x), t[1] = from_f32<T>(a.y), t[2] = from_f32<T>(a.z), t[3] = from_f32<T>(a.w);
  t[4] = from_f32<T>(b.x), t[5] = from_f32<T>(b.y), t[6] = from_f32<T>(b.z), t[7] = from_f32<T>(b.w);
  return u;
}

// D: the kernel's head size (64, 128 or 256), head_dim ≤ D and a multiple of 8 (ops.rs).
template <typename T, int D>
__device__ void attention(const float* q, const float* k, const float* v, const T* cache_k,
                          const T* cache_v, const unsigned* tables, const RowMeta* meta, float* out,
                          float* parts, unsigned* counts, int heads, int kv_heads, int head_dim,
                          int block_size, float scale, int window, int ring_keep, int ring_window,
                          const int* row_ids) {
  constexpr int LPK = D / 8;                       // lanes per key
  constexpr int WORKERS = ATT_WARPS * (WARP / LPK);  // key readers in the block
  const int row = row_ids ? row_ids[blockIdx.x] : blockIdx.x, split = blockIdx.z, splits = gridDim.z;
  const int group = heads / kv_heads, chunks = (group + ATT_GH - 1) / ATT_GH;
  const int kvh = blockIdx.y / chunks, head0 = kvh * group + (blockIdx.y % chunks) * ATT_GH;
  const int gh = min(ATT_GH, kvh * group + group - head0);  // heads of this block
  const int lane = threadIdx.x % WARP, sub = lane % LPK;
  const int worker = threadIdx.x / LPK, dim = 8 * sub;  // this lane's 8 dimensions
  const bool live = dim < head_dim;
  const RowMeta m = meta[row];

  float qv[ATT_GH][8], acc[ATT_GH][8], mx[ATT_GH], sum[ATT_GH];
#pragma unroll
  for (int g = 0; g < ATT_GH; g++) {
    const float* qg = q + ((long)row * heads + head0 + g) * head_dim + dim;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      qv[g][i] = g < gh && live ? qg[i] * scale : 0.f;
      acc[g][i] = 0.f;
    }
    mx[g] = -INFINITY;
    sum[g] = 0.f;
  }
  // The visible positions: [first, kept_end) then [recent_start, qpos].
  const int first = window > 0 ? max(m.qpos + 1 - window, 0) : 0;
  int keep = 0, recent = 0;
  if (ring_window > 0) {
    keep = ring_keep;
    recent = max(m.qpos + 1 - ring_window, 0);
  }
  const int kept_end = max(min(keep, m.qpos + 1), first);
  const int recent_start = max(max(first, keep), recent);
  // Either range may be empty (a position before the ring's `keep` has no recent range).
  const int n_kept = kept_end - first, n = n_kept + max(m.qpos + 1 - recent_start, 0);
  // This split's keys; splits past the keys (short rows) have nothing to add and leave.
  const int per = max((n + splits - 1) / splits, ATT_MIN_SPLIT);
  const int active = (n + per - 1) / per;  // the splits that hold keys
  if (split >= active) return;
  const int j_begin = split * per, j_end = min(n, j_begin + per);

  // The bound is the block's, so a warp's lanes go round together (they shuffle).
  for (int base = j_begin; base < j_end; base += WORKERS * ATT_U) {
    const int j0 = base + worker;
    uint4 kr[ATT_U], vr[ATT_U];
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
      const int j = min(j0 + u * WORKERS, j_end - 1);  // past the end: the last, unweighted
      const int p = j < n_kept ? first + j : recent_start + (j - n_kept);
      kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      if (!live) continue;
      if (p >= m.start) {
        const long base = ((long)(m.seq_row + p - m.start) * kv_heads + kvh) * head_dim + dim;
        kr[u] = pack8<T>(k + base);
        vr[u] = pack8<T>(v + base);
      } else {
        const int slot = (ring_window > 0 && p >= ring_keep) ? ring_keep + (p - ring_keep) % ring_window : p;
        const long block = tables[m.table_offset + slot / block_size];
        const long base = cache_at(block, slot, kvh, kv_heads, block_size, head_dim) + dim;
        kr[u] = *reinterpret_cast<const uint4*>(cache_k + base);
        vr[u] = *reinterpret_cast<const uint4*>(cache_v + base);
      }
    }
    // Scores: each lane's 8 products, summed over the key's LPK lanes.
    float s[ATT_U][ATT_GH];
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
      float kf[8];
      unpack8(kr[u], T(), kf);
#pragma unroll
      for (int g = 0; g < ATT_GH; g++) {
        s[u][g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) s[u][g] += qv[g][i] * kf[i];
      }
    }
#pragma unroll
    for (int o = LPK / 2; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < ATT_U; u++)
#pragma unroll
        for (int g = 0; g < ATT_GH; g++) s[u][g] += __shfl_xor_sync(0xffffffff, s[u][g], o);
#pragma unroll
    for (int g = 0; g < ATT_GH; g++) {
      float new_mx = mx[g];
#pragma unroll
      for (int u = 0; u < ATT_U; u++) {
        if (j0 + u * WORKERS >= j_end) s[u][g] = -INFINITY;
        new_mx = fmaxf(new_mx, s[u][g]);
      }
      if (new_mx == -INFINITY) continue;  // no key of this worker yet
      const float correction = expf(mx[g] - new_mx);  // 0 on the first batch (mx = -inf)
      sum[g] *= correction;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] *= correction;
      mx[g] = new_mx;
    }
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
      float vf[8];
      unpack8(vr[u], T(), vf);
#pragma unroll
      for (int g = 0; g < ATT_GH; g++) {
        const float w = s[u][g] == -INFINITY ? 0.f : expf(s[u][g] - mx[g]);
        sum[g] += w;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] += w * vf[i];
      }
    }
  }

  // Merge the workers (a worker without keys has sum 0 and takes no part): thread t
  // takes outputs (head g, dimension d) t, t + blockDim, ...
  __shared__ float s_mx[WORKERS][ATT_GH], s_sum[WORKERS][ATT_GH];
  __shared__ float s_acc[WORKERS][ATT_GH][D];
  __shared__ bool s_last;
#pragma unroll
  for (int g = 0; g < ATT_GH; g++) {
    if (sub == 0) {
      s_mx[worker][g] = mx[g];
      s_sum[worker][g] = sum[g];
    }
#pragma unroll
    for (int i = 0; i < 8; i++) s_acc[worker][g][dim + i] = acc[g][i];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < gh * head_dim; t += blockDim.x) {
    const int g = t / head_dim, d = t % head_dim;
    float gmx = -INFINITY;
    for (int w = 0; w < WORKERS; w++)
      if (s_sum[w][g] > 0.f) gmx = fmaxf(gmx, s_mx[w][g]);
    float total = 0.f, o = 0.f;
    for (int w = 0; w < WORKERS; w++) {
      if (s_sum[w][g] <= 0.f) continue;
      const float f = expf(s_mx[w][g] - gmx);
      total += f * s_sum[w][g];
      o += f * s_acc[w][g][d];
    }
    const long rh = (long)row * heads + head0 + g;
    if (active == 1) {
      out[rh * head_dim + d] = o / total;
    } else {
      // parts: [rows·heads, splits, head_dim + 2], the split's (acc, max, sum).
      float* part = parts + (rh * splits + split) * (head_dim + 2);
      part[d] = o;
      if (d == 0) {
        part[head_dim] = gmx;
        part[head_dim + 1] = total;
      }
    }
  }
  if (active == 1) return;
  // The last block of the row and chunk to finish merges the splits. Every load of a
  // round is independent of the others (a merge is a few round trips to L2, not one a
  // split): each split's (max, sum), then its weight exp(max - global max) in shared
  // memory, then Σ weight · acc over the splits for each output.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* count = counts + (long)row * gridDim.y + blockIdx.y;
    s_last = atomicAdd(count, 1u) == (unsigned)active - 1;
    if (s_last) *count = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  __shared__ float s_zmx[ATT_GH][ATT_MAX_SPLITS], s_zsum[ATT_GH][ATT_MAX_SPLITS], s_total[ATT_GH];
  const long rh0 = (long)row * heads + head0;
  const int stride = head_dim + 2;
  for (int t = threadIdx.x; t < gh * active; t += blockDim.x) {
    const float* pz = parts + ((rh0 + t / active) * splits + t % active) * stride;
    s_zmx[t / active][t % active] = __ldcg(pz + head_dim);
    s_zsum[t / active][t % active] = __ldcg(pz + head_dim + 1);
  }
  __syncthreads();
  if (threadIdx.x < gh) {
    const int g = threadIdx.x;
    float gmx = -INFINITY, total = 0.f;
    for (int z = 0; z < active; z++) gmx = fmaxf(gmx, s_zmx[g][z]);  // every split has keys
    for (int z = 0; z < active; z++) {
      s_zmx[g][z] = expf(s_zmx[g][z] - gmx);  // now the split's weight
      total += s_zmx[g][z] * s_zsum[g][z];
    }
    s_total[g] = total;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < gh * head_dim; t += blockDim.x) {
    const int g = t / head_dim, d = t % head_dim;
    const float* part = parts + (rh0 + g) * splits * stride + d;
    float o = 0.f;
#pragma unroll 8
    for (int z = 0; z < active; z++) o += s_zmx[g][z] * __ldcg(part + z * stride);
    out[(rh0 + g) * head_dim + d] = o / s_total[g];
  }
}

#define ATTENTION(NAME, T, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(ATT_WARPS* WARP, 1)                                  \
      NAME(const float* q, const float* k, const float* v, const T* cache_k, const T* cache_v,      \
           const unsigned* tables, const RowMeta* meta, float* out, float* parts, unsigned* counts, \
           int heads, int kv_heads, int head_dim, int block_size, float scale, int window,          \
           int ring_keep, int ring_window, const int* row_ids) {                                    \
    PDL_ENTER();                                                                                    \
    attention<T, D>(q, k, v, cache_k, cache_v, tables, meta, out, parts, counts, heads, kv_heads,  \
                    head_dim, block_size, scale, window, ring_keep, ring_window, row_ids);          \
  }
ATTENTION(attention_f16_64, __half, 64)
ATTENTION(attention_f16_128, __half, 128)
ATTENTION(attention_f16_256, __half, 256)
ATTENTION(attention_bf16_64, __nv_bfloat16, 64)
ATTENTION(attention_bf16_128, __nv_bfloat16, 128)
ATTENTION(attention_bf16_256, __nv_bfloat16, 256)

// The rows' fresh keys and values into the cache: element (row, h, d) of k/v goes to the
// slot `slots[row]` (its block · block_size + index in the block), or nowhere when the
// slot is -1 (a position a ring will not keep is never written).
template <typename T>
__device__ void kv_store(const float* k, const float* v, T* cache_k, T* cache_v, const long* slots,
                         int rows, int kv_heads, int head_dim, int block_size) {
  const long n = (long)rows * kv_heads * head_dim;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const int d = i % head_dim;
    const long rh = i / head_dim;
    const int h = rh % kv_heads, row = rh / kv_heads;
    const long slot = slots[row];
    if (slot < 0) continue;
    const long dst = cache_at(slot / block_size, slot, h, kv_heads, block_size, head_dim) + d;
    cache_k[dst] = from_f32<T>(k[i]);
    cache_v[dst] = from_f32<T>(v[i]);
  }
}

extern "C" __global__ void kv_store_f16(const float* k, const float* v, __half* ck, __half* cv,
                                        const long* slots, int rows, int kv_heads, int head_dim,
                                        int block_size) {
  PDL_ENTER();
  kv_store(k, v, ck, cv, slots, rows, kv_heads, head_dim, block_size);
}

extern "C" __global__ void kv_store_bf16(const float* k, const float* v, __nv_bfloat16* ck,
                                         __nv_bfloat16* cv, const long* slots, int rows, int kv_heads,
                                         int head_dim, int block_size) {
  PDL_ENTER();
  kv_store(k, v, ck, cv, slots, rows, kv_heads, head_dim, block_size);
}

// ---------------------------------------------------------------------------------------
// Affine-quantized weights (MLX's layout, quant/affine.rs): row r of W [n, k] is
// k·BITS/32 u32 words, value v at bit v·BITS of the row's little-endian stream; scales and
// biases are [n, k/group] and w = scale·q + bias. 32 consecutive values (a chunk) are
// exactly BITS aligned words.

template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 4) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
  } else if constexpr (BITS == 8) {
    const uint4 a = *reinterpret_cast<const uint4*>(p), b = *reinterpret_cast<const uint4*>(p + 4);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else if constexpr (BITS == 2) {
    const uint2 a = *reinterpret_cast<const uint2*>(p);
    w[0] = a.x, w[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS; i++) w[i] = p[i];
  }
}

// Code j (0..31) of a chunk; BITS and j are compile-time after unrolling.
template <int BITS>
__device__ __forceinline__ uint32_t code_bits(const uint32_t (&w)[BITS], int j) {
  const int bit = j * BITS, word = bit / 32, shift = bit % 32;
  uint32_t q = w[word] >> shift;
  if (shift + BITS > 32) q |= w[word + 1] << (32 - shift);
  return q & ((1u << BITS) - 1);
}

template <int BITS>
__device__ __forceinline__ float code(const uint32_t (&w)[BITS], int j) {
  return (float)code_bits<BITS>(w, j);
}

// 1 + q / 2^BITS as a float, built in the mantissa's top bits: a shift and a mask-or, no
// int-to-float conversion (a quarter-rate instruction). Σ (1 + q/2^B)·x = Σx + Σq·x / 2^B.
template <int BITS>
__device__ __forceinline__ float one_plus_code(const uint32_t (&w)[BITS], int j) {
  return __uint_as_float((code_bits<BITS>(w, j) << (23 - BITS)) | 0x3F800000u);
}

// Decode GEMV for codes in MLX's layout (3, 5 and 6 bits, which straddle words; 2, 4 and
// 8-bit codes take the q8 GEMV below), f32 activations, y[m, :] = x[m, :] · Wᵀ for
// m < M <= 8: each warp takes GEMV_ROWS
// consecutive output rows (so each chunk of x it reads serves that many rows of W), lane l
// chunks l, l + 32, ...; per chunk, row and row of x, Σ q·x and Σ x give
// scale·Σq·x + bias·Σx (Σq·x from one_plus_code). A row's arithmetic does not depend on M
// (batch-invariant). 4 warps per block: a block covers GEMV_WARPS · GEMV_ROWS = 8 output rows.
#define GEMV_WARPS 4
#define GEMV_ROWS 2

// A GEMV warp's sums, lane by lane, into y[m, r0 + rr] (rows past n are not written).
__device__ __forceinline__ void gemv_store(float (&acc)[GEMV_ROWS][8], float* y, int n, int r0, int M,
                                           int lane) {
#pragma unroll
  for (int rr = 0; rr < GEMV_ROWS; rr++) {
#pragma unroll
    for (int mm = 0; mm < 8; mm++) {
      if (mm >= M) break;
      const float t = warp_sum(acc[rr][mm]);
      if (lane == 0 && r0 + rr < n) y[(long)mm * n + r0 + rr] = t;
    }
  }
}
template <int BITS, typename S>
__device__ void affine_gemv(const uint32_t* w, const S* scales, const S* biases, const float* x,
                            float* y, int n, int k, int group, int M) {
  const int lane = threadIdx.x % WARP;
  const int r0 = (blockIdx.x * GEMV_WARPS + threadIdx.x / WARP) * GEMV_ROWS;
  if (r0 >= n) return;
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  float acc[GEMV_ROWS][8] = {};
#pragma unroll 2
  for (int c = lane; c < chunks; c += WARP) {
    // Both rows' codes first (loads in flight together), then the products.
    float q[GEMV_ROWS][32], s[GEMV_ROWS], b[GEMV_ROWS];
    const int g = c / chunks_per_group;
#pragma unroll
    for (int rr = 0; rr < GEMV_ROWS; rr++) {
      const int r = min(r0 + rr, n - 1);  // a missing last row repeats the one before, unwritten
      uint32_t words[BITS];
      load_chunk<BITS>(w + ((long)r * chunks + c) * BITS, words);
      s[rr] = to_f32(scales[(long)r * groups + g]);
      b[rr] = to_f32(biases[(long)r * groups + g]);
#pragma unroll
      for (int j = 0; j < 32; j++) q[rr][j] = one_plus_code<BITS>(words, j);
    }
#pragma unroll
    for (int mm = 0; mm < 8; mm++) {
      if (mm >= M) break;
      const float4* xp = reinterpret_cast<const float4*>(x + (long)mm * k + c * 32);
      float dot[GEMV_ROWS] = {0.f}, xs = 0.f;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const float4 xv = xp[j];
        xs += xv.x + xv.y + xv.z + xv.w;
#pragma unroll
        for (int rr = 0; rr < GEMV_ROWS; rr++)
          dot[rr] += q[rr][4 * j] * xv.x + q[rr][4 * j + 1] * xv.y + q[rr][4 * j + 2] * xv.z +
                     q[rr][4 * j + 3] * xv.w;
      }
      // dot = Σx + Σq·x / 2^BITS.
#pragma unroll
      for (int rr = 0; rr < GEMV_ROWS; rr++)
        acc[rr][mm] += s[rr] * ((dot[rr] - xs) * (float)(1 << BITS)) + b[rr] * xs;
    }
  }
  gemv_store(acc, y, n, r0, M, lane);
}

// ---------------------------------------------------------------------------------------
// Block GEMVs: y[m, :] = x[m, :] · Wᵀ for m < M <= 8. A warp takes BG_WARP_ROWS output rows
// whole, BG_WARPS warps a block (BG_ROWS rows). Lane l takes units l, l + 32, ... of the rows
// (a unit is 16 bytes of a row, or 32 codes), BG_UNITS of them a row in flight at once (every
// load is wide and many are outstanding: a decode step's GEMVs are bound by memory latency as
// much as bandwidth), then the warp sums its lanes (a fixed butterfly, no shared memory and
// no barrier). A row's arithmetic does not depend on M (batch-invariant). Weights are
// streamed past L1 (read once). One launch serves up to three matrices of one input (q/k/v,
// gate/up): block b belongs to matrix 0 for b < ceil(n0 / BG_ROWS), and so on. Measured on
// an H200 against the earlier 4-row block design (weights cold in L2, graph-timed, 4-bit):
// 4096×4096 5.4 → 4.8 µs, 6144×4096 7.9 → 5.8, 28672×4096 23.0 → 20.8, 4096×14336 12.7 →
// 11.9.
#define BG_WARPS 4
#define BG_WARP_ROWS 2
#define BG_ROWS (BG_WARPS * BG_WARP_ROWS)
#define BG_UNITS 4
// The float GEMV's own: four rows a warp, two units a row in flight. Measured on the H200
// (bf16, weights cycled past L2, graph-timed; µs, two rows and four units → this): 6144×4096
// 14.95 → 14.28, 4096×4096 11.55 → 11.21, 28672×4096 56.30 → 55.08, 4096×14336 33.64 →
// 32.11, 49152×4096 101.2 → 91.0; the GEMVs of an 8B decode step 3.83 → 3.70 ms. (One row
// and eight units, or eight units of two rows, read slower; so did loading the next units
// before using these.)
#define DG_WARP_ROWS 4
#define DG_UNITS 2

// 16 bytes of weights, not kept in L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 a;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w)
               : "l"(p));
  return a;
}

// The warp's sums into y[m, r0 + rr] (rows past n are not written).
template <int WR, int MM>
__device__ __forceinline__ void warp_gemv_store(float (&acc)[WR][MM], float* y, int n, int r0, int M) {
#pragma unroll
  for (int rr = 0; rr < WR; rr++) {
#pragma unroll
    for (int mm = 0; mm < MM; mm++) {
      if (mm >= M) break;
      const float t = warp_sum(acc[rr][mm]);
      if (threadIdx.x % WARP == 0 && r0 + rr < n) y[(long)mm * n + r0 + rr] = t;
    }
  }
}

// Which of up to three matrices block `b` works on, and this warp's first row there, for
// WR rows a warp (BG_WARPS * WR a block).
template <int WR>
__device__ __forceinline__ int block_matrix(int n0, int n1, int* r0) {
  constexpr int rows = BG_WARPS * WR;
  const int b0 = (n0 + rows - 1) / rows, b1 = (n1 + rows - 1) / rows;
  const int b = blockIdx.x;
  const int which = b < b0 ? 0 : b < b0 + b1 ? 1 : 2;
  *r0 = (b - (which > 0 ? b0 : 0) - (which > 1 ? b1 : 0)) * rows + threadIdx.x / WARP * WR;
  return which;
}

// Float weights (bf16 or f16) with f32 activations and sums; a unit is 8 values (16 bytes)
// of a row. k is a multiple of 8.
template <int MM, typename W>
__device__ void dense_gemv(const W* w, const float* x, float* y, int n, int r0, int k, int M) {
  PDL_NEXT();
  if (r0 >= n) return;
  const int lane = threadIdx.x % WARP, units = k / 8;
  float acc[DG_WARP_ROWS][MM] = {};
  for (int c0 = 0; c0 < units; c0 += WARP * DG_UNITS) {
    uint4 raw[DG_UNITS][DG_WARP_ROWS];
#pragma unroll
    for (int u = 0; u < DG_UNITS; u++)
#pragma unroll
      for (int rr = 0; rr < DG_WARP_ROWS; rr++)  // past the end: the last unit, unused
        raw[u][rr] = load_stream(w + (long)min(r0 + rr, n - 1) * k + min(c0 + lane + WARP * u, units - 1) * 8);
    if (c0 == 0) PDL_WAIT();  // the weights are in flight; x is the previous kernel's
#pragma unroll
    for (int u = 0; u < DG_UNITS; u++) {
      const int c = c0 + lane + WARP * u;
      if (c >= units) break;
#pragma unroll
      for (int mm = 0; mm < MM; mm++) {
        if (mm >= M) break;
        const float4* xp = reinterpret_cast<const float4*>(x + (long)mm * k + c * 8);
        const float4 a = xp[0], b = xp[1];
#pragma unroll
        for (int rr = 0; rr < DG_WARP_ROWS; rr++) {
          const W* v = reinterpret_cast<const W*>(&raw[u][rr]);
          acc[rr][mm] += to_f32(v[0]) * a.x + to_f32(v[1]) * a.y + to_f32(v[2]) * a.z + to_f32(v[3]) * a.w +
                         to_f32(v[4]) * b.x + to_f32(v[5]) * b.y + to_f32(v[6]) * b.z + to_f32(v[7]) * b.w;
        }
      }
    }
  }
  warp_gemv_store(acc, y, n, r0, M);
}

// Kernels come in buckets of MM = 1, 2, 4, 8 rows of x (name suffix _mMM; M <= MM): the
// sums live in registers, and a bucket's loops unroll to exactly its rows.
#define DENSE_GEMV(NAME, W, MM)                                                                     \
  extern "C" __global__ void __launch_bounds__(BG_WARPS* WARP)                                      \
      NAME##_m##MM(const W* w0, float* y0, int n0, const W* w1, float* y1, int n1, const W* w2,     \
                   float* y2, int n2, const float* x, int k, int M) {                               \
    int r0;                                                                                         \
    const int which = block_matrix<DG_WARP_ROWS>(n0, n1, &r0);                                      \
    if (which == 0) dense_gemv<MM>(w0, x, y0, n0, r0, k, M);                                        \
    else if (which == 1) dense_gemv<MM>(w1, x, y1, n1, r0, k, M);                                   \
    else dense_gemv<MM>(w2, x, y2, n2, r0, k, M);                                                   \
  }
#define DENSE_GEMV_ALL(MM) DENSE_GEMV(dense_gemv_bf16, __nv_bfloat16, MM) DENSE_GEMV(dense_gemv_f16, __half, MM)
DENSE_GEMV_ALL(1)
DENSE_GEMV_ALL(2)
DENSE_GEMV_ALL(4)
DENSE_GEMV_ALL(8)

// Activations rounded to int8 per block of 32 ("q8", as llama.cpp's q8_1 and the CPU's
// quantized path do): xq = round(x / d) with d = max|x| / 127, and the sum of the rounded
// values d·Σxq for the affine bias term. (That sum, not the exact Σx: then every product is
// w·(d·xq) with w = scale·q + bias, whose error is w·δx; with the exact sum it would be
// scale·q·δx, several times larger where a group's bias is large.) Per block, `ds` holds the
// pair (d, d·Σxq). One warp per block.
extern "C" __global__ void quantize_q8(const float* x, int8_t* xq, float2* ds, long blocks) {
  PDL_ENTER();
  const long b = (blockIdx.x * (long)blockDim.x + threadIdx.x) / WARP;
  if (b >= blocks) return;  // a whole warp leaves together
  const int lane = threadIdx.x % WARP;
  const float v = x[b * 32 + lane];
  const float d = warp_max(fabsf(v)) / 127.f;
  const int q = d > 0.f ? __float2int_rn(v / d) : 0;
  const float s = d * warp_sum((float)q);  // an exact integer sum
  xq[b * 32 + lane] = (int8_t)q;
  if (lane == 0) ds[b] = make_float2(d, s);
}

// Σ of four u8 × s8 products plus c (dp4a with unsigned codes: 8-bit codes reach 255).
__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The mask that keeps one code a byte of (word >> BITS·s) in the integer layout (below).
template <int BITS>
__device__ __forceinline__ constexpr uint32_t byte_codes() {
  return BITS == 8 ? 0xFFFFFFFFu : BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
}

// Σ q·xq over a chunk of 32 codes in the integer layout the 2/4/8-bit weights are repacked
// into at upload (weights.rs `int_layout`): code i of a word sits in byte i % 4, BITS·(i / 4)
// bits up, so that byte j of (word >> BITS·s) & mask holds code 4s + j, and each dp4a takes
// four codes against one word of xq.
template <int BITS>
__device__ __forceinline__ int chunk_dot(const uint32_t (&w)[BITS], const int (&xw)[8]) {
  int t = 0;
  if constexpr (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 8; i++) t = dp4a_us(w[i], xw[i], t);
  } else {
    constexpr uint32_t mask = byte_codes<BITS>();
    constexpr int per_word = 32 / BITS;  // codes per word: 8 or 16
#pragma unroll
    for (int i = 0; i < BITS; i++)
#pragma unroll
      for (int sft = 0; sft < per_word / 4; sft++)
        t = __dp4a((int)((w[i] >> (BITS * sft)) & mask), xw[i * (per_word / 4) + sft], t);
  }
  return t;
}

// Affine weights in the integer layout (2, 4 or 8 bits) against q8 activations: per chunk
// of 32 codes, row and row of x, y += scale·d·Σq·xq + bias·d·Σxq.
template <int BITS, int MM, typename S>
__device__ void q8_gemv(const uint32_t* w, const S* scales, const S* biases, float* y, int n, int r0,
                        const int8_t* xq, const float2* ds, int k, int group, int M) {
  PDL_NEXT();
  if (r0 >= n) return;
  const int lane = threadIdx.x % WARP;
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  float acc[BG_WARP_ROWS][MM] = {};
  for (int c0 = 0; c0 < chunks; c0 += WARP * BG_UNITS) {
    uint32_t words[BG_UNITS][BG_WARP_ROWS][BITS];
    float s[BG_UNITS][BG_WARP_ROWS], b[BG_UNITS][BG_WARP_ROWS];
#pragma unroll
    for (int u = 0; u < BG_UNITS; u++) {
      const int c = min(c0 + lane + WARP * u, chunks - 1);  // past the end: the last, unused
#pragma unroll
      for (int rr = 0; rr < BG_WARP_ROWS; rr++) {
        const int r = min(r0 + rr, n - 1);  // a missing last row repeats the one before, unwritten
        const uint32_t* p = w + ((long)r * chunks + c) * BITS;
        if constexpr (BITS == 4 || BITS == 8) {
#pragma unroll
          for (int h = 0; h < BITS / 4; h++) {
            const uint4 a = load_stream(p + 4 * h);
            words[u][rr][4 * h] = a.x, words[u][rr][4 * h + 1] = a.y;
            words[u][rr][4 * h + 2] = a.z, words[u][rr][4 * h + 3] = a.w;
          }
        } else {
          load_chunk<BITS>(p, words[u][rr]);
        }
        s[u][rr] = to_f32(scales[(long)r * groups + c / chunks_per_group]);
        b[u][rr] = to_f32(biases[(long)r * groups + c / chunks_per_group]);
      }
    }
    if (c0 == 0) PDL_WAIT();  // the weights are in flight; xq and ds are the previous kernel's
#pragma unroll
    for (int u = 0; u < BG_UNITS; u++) {
      const int c = c0 + lane + WARP * u;
      if (c >= chunks) break;
#pragma unroll
      for (int mm = 0; mm < MM; mm++) {
        if (mm >= M) break;
        const int4* xp = reinterpret_cast<const int4*>(xq + (long)mm * k + c * 32);
        const int4 lo = xp[0], hi = xp[1];
        const int xw[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const float2 e = ds[(long)mm * chunks + c];
#pragma unroll
        for (int rr = 0; rr < BG_WARP_ROWS; rr++)
          acc[rr][mm] += s[u][rr] * (e.x * (float)chunk_dot<BITS>(words[u][rr], xw)) + b[u][rr] * e.y;
      }
    }
  }
  warp_gemv_store(acc, y, n, r0, M);
}

#define Q8_GEMV(BITS, SNAME, S, MM)                                                                 \
  extern "C" __global__ void __launch_bounds__(BG_WARPS* WARP) q8_gemv_##BITS##_##SNAME##_m##MM(    \
      const uint32_t* w0, const S* s0, const S* b0, float* y0, int n0, const uint32_t* w1,          \
      const S* s1, const S* b1, float* y1, int n1, const uint32_t* w2, const S* s2, const S* b2,    \
      float* y2, int n2, const int8_t* xq, const float2* ds, int k, int group, int M) {             \
    int r0;                                                                                         \
    const int which = block_matrix<BG_WARP_ROWS>(n0, n1, &r0);                                      \
    if (which == 0) q8_gemv<BITS, MM, S>(w0, s0, b0, y0, n0, r0, xq, ds, k, group, M);              \
    else if (which == 1) q8_gemv<BITS, MM, S>(w1, s1, b1, y1, n1, r0, xq, ds, k, group, M);         \
    else q8_gemv<BITS, MM, S>(w2, s2, b2, y2, n2, r0, xq, ds, k, group, M);                         \
  }
#define Q8_GEMV_S(BITS, MM) \
  Q8_GEMV(BITS, f32, float, MM) Q8_GEMV(BITS, f16, __half, MM) Q8_GEMV(BITS, bf16, __nv_bfloat16, MM)
#define Q8_GEMV_ALL(BITS) Q8_GEMV_S(BITS, 1) Q8_GEMV_S(BITS, 2) Q8_GEMV_S(BITS, 4) Q8_GEMV_S(BITS, 8)
Q8_GEMV_ALL(2)
Q8_GEMV_ALL(4)
Q8_GEMV_ALL(8)

// ---------------------------------------------------------------------------------------
// Quantized GEMM for batched decoding and short prompts (more than 8 and fewer than
// weights.rs `DEQUANT_MIN_ROWS` rows of input; 2, 4 and 8-bit codes in the integer layout)
// on the bf16 tensor cores: each warp dequantizes its weights in registers to bf16(scale·q +
// bias), as `int_dequant` does for long prompts (which rounds through f32 first: the two
// can differ by a bf16 step in rare ties), and multiplies them by the input in bf16, summing
// in f32 (mma.m16n8k16). Measured against the int8 GEMM it replaced (int8 products
// of q8 inputs, each chunk's sum scaled in f32, which was most of its instructions) on an
// H200, 4-bit g64, weights cold in L2, µs at 16 / 32 / 64 / 128 rows: 4096×4096 14.5 → 12.0,
// 19.1 → 15.8, 25.7 → 23.4, 42.5 → 43.1; 14336×4096 39.6 → 28.6, 54.3 → 38.7, 86.3 → 75.9,
// 137.6 → 103.2; 4096×14336 33.7 → 30.9, 48.8 → 39.8, 72.2 → 71.0, 124.4 → 126.9.
//
// Input rows are the A operand (16 a tile, MT tiles a block), weight rows the B operand (8 a
// tile, AM_NT tiles a warp, AM_RW warps a block: AM_ROWS rows). A span is 4 chunks of 32
// codes: lane 4·gid + tid takes chunk 4·span + tid of weight row gid of each of its tiles
// (BITS words: one 16-byte load for 4-bit codes), the next span's in flight while this one
// multiplies. The block's warps read the same input rows, from L1 after the first. Where
// the blocks are too few to fill the GPU, grid z splits the spans into parts, added up by
// `sum_parts`.
//
// The order of the k products within an mma is free, so each takes one quad (4 consecutive
// codes) of each lane's chunk: in the integer layout (weights.rs `int_layout`), (word >>
// BITS·s) masked at bits 0 and 16 holds codes (4s, 4s + 2) in its halves and (word >> BITS·s
// + 8) codes (4s + 1, 4s + 3); OR'd with 0x4300 a half is the bf16 128 + q, exact. The input
// is cast to bf16 in that order, [x0, x2, x1, x3] a quad (`cast_f32_bf16_quads`), so that one
// 16-byte load of an input row gives its A fragments for two quads. With bf16 scales (MLX's
// from bf16 checkpoints) the dequantization is bf16 arithmetic; otherwise f32 (`am_wide`).
#define AM_SPAN 4  // chunks a span: one a lane of a group of 4 (tid)
#define AM_RW 4
#define AM_NT 4
#define AM_ROWS (8 * AM_NT * AM_RW)
#define AM_MAGIC 0x43004300u  // bf16x2 (128, 128), codes in the low mantissa bits

__device__ __forceinline__ uint32_t bf16x2_fma(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t bf16x2_of(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Whether a GEMM over scales of type S (and BITS-bit codes) dequantizes in f32: bf16 scales
// and biases with 2 or 4-bit codes take bf16 arithmetic, exact up to its one rounding;
// others would lose bits to it (f16 and f32 scales, the bias's error then the same across a
// group, so not averaging out), and 8-bit codes reach 255, where 128 + q, the magic-number
// conversion below, is past bf16's exact integers.
template <int BITS, typename S> constexpr bool am_wide = true;
template <> constexpr bool am_wide<2, __nv_bfloat16> = false;
template <> constexpr bool am_wide<4, __nv_bfloat16> = false;

// Codes (4s, 4s + 2) and (4s + 1, 4s + 3) of a word (quad s), dequantized to bf16x2 pairs:
// w = scale·q + bias, either in bf16 (`s2`, `b2`: scale and bias as bf16x2 pairs) and rounded
// once, or (WIDE) in f32 (`sf`, `bf`) and then rounded, as `int_dequant` computes it.
template <int BITS, bool WIDE>
__device__ __forceinline__ void dequant_quad(uint32_t word, int s, uint32_t s2, uint32_t b2, float sf, float bf,
                                             uint32_t& lo, uint32_t& hi) {
  constexpr uint32_t code = (1u << BITS) - 1;
  if constexpr (WIDE) {
    // Bytes 0 and 2, then 1 and 3, shifted down by BITS·s, as exact floats (2^23 + q − 2^23).
    const auto f = [&](int shift) {
      return fmaf(sf, __uint_as_float(0x4B000000u | (word >> shift & code)) - 8388608.f, bf);
    };
    lo = bf16x2_of(f(BITS * s), f(BITS * s + 16));
    hi = bf16x2_of(f(BITS * s + 8), f(BITS * s + 24));
  } else {
    constexpr uint32_t mask = code | code << 16;
    constexpr uint32_t one = 0x3F803F80u, minus128 = 0xC300C300u;  // bf16x2 (1, 1), (−128, −128)
    const uint32_t plo = (word >> (BITS * s)) & mask | AM_MAGIC, phi = (word >> (BITS * s + 8)) & mask | AM_MAGIC;
    lo = bf16x2_fma(bf16x2_fma(plo, one, minus128), s2, b2);
    hi = bf16x2_fma(bf16x2_fma(phi, one, minus128), s2, b2);
  }
}

__device__ __forceinline__ uint32_t bf16x2_splat(__nv_bfloat16 v) {
  const uint32_t h = __bfloat16_as_ushort(v);
  return h | h << 16;
}

// One span of a lane's weights: its chunk of each of its weight rows, and their scales and
// biases (bf16x2 pairs, or f32 where `am_wide`), zero where the chunk is past k (a short last
// span, whose input is then zeros too).
template <int BITS>
struct AmSpan {
  uint32_t words[AM_NT][BITS];
  uint32_t s2[AM_NT], b2[AM_NT];
  float sf[AM_NT], bf[AM_NT];
  int chunk;
  bool real;
};

template <int BITS, typename S>
__device__ __forceinline__ void am_load(AmSpan<BITS>& t, const uint32_t* w, const S* scales, const S* biases,
                                        const int (&rows)[AM_NT], int sp, int chunks, int groups,
                                        int chunks_per_group) {
  const int c = AM_SPAN * sp + threadIdx.x % 4;
  t.real = c < chunks;
  t.chunk = t.real ? c : chunks - 1;
#pragma unroll
  for (int nt = 0; nt < AM_NT; nt++) {
    const uint32_t* p = w + ((long)rows[nt] * chunks + t.chunk) * BITS;
    if constexpr (BITS == 2) {
      asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
                   : "=r"(t.words[nt][0]), "=r"(t.words[nt][1])
                   : "l"(p));
    } else {
#pragma unroll
      for (int h = 0; h < BITS / 4; h++) {
        const uint4 a = load_stream(p + 4 * h);
        t.words[nt][4 * h] = a.x, t.words[nt][4 * h + 1] = a.y, t.words[nt][4 * h + 2] = a.z;
        t.words[nt][4 * h + 3] = a.w;
      }
    }
    const long g = (long)rows[nt] * groups + t.chunk / chunks_per_group;
    if constexpr (am_wide<BITS, S>) {
      t.sf[nt] = t.real ? to_f32(scales[g]) : 0.f, t.bf[nt] = t.real ? to_f32(biases[g]) : 0.f;
    } else {
      t.s2[nt] = t.real ? bf16x2_splat(scales[g]) : 0u, t.b2[nt] = t.real ? bf16x2_splat(biases[g]) : 0u;
    }
  }
}

// acc += a span's products: word by word of the lane's chunk, each word's quads one mma step
// (4-bit: 2 a word, 2-bit: 4, 8-bit: 1). The input comes from global memory: the block's
// warps read the same rows of it, so all but the first find it in L1.
template <int BITS, bool WIDE, int MT>
__device__ __forceinline__ void am_multiply(float (&acc)[MT][AM_NT][4], const AmSpan<BITS>& t,
                                            const __nv_bfloat16* x, int m0, int k) {
  constexpr int QUADS = BITS == 8 ? 1 : 8 / BITS;
  const int gid = threadIdx.x % WARP / 4;
#pragma unroll
  for (int i = 0; i < BITS; i++) {
    // The input's A fragments for these quads: rows gid and gid + 8 of each tile, a bf16
    // pair (x[4s], x[4s+2]) and (x[4s+1], x[4s+3]) a quad.
    uint32_t xa[MT][2][2 * QUADS];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const __nv_bfloat16* xp = x + (long)(m0 + 16 * mt + gid + 8 * h) * k + t.chunk * 32 + i * 4 * QUADS;
        if constexpr (QUADS == 1) {
          const uint2 v = *reinterpret_cast<const uint2*>(xp);
          xa[mt][h][0] = t.real ? v.x : 0u, xa[mt][h][1] = t.real ? v.y : 0u;
        } else {
#pragma unroll
          for (int j = 0; j < QUADS / 2; j++) {
            const uint4 v = reinterpret_cast<const uint4*>(xp)[j];
            xa[mt][h][4 * j] = t.real ? v.x : 0u, xa[mt][h][4 * j + 1] = t.real ? v.y : 0u;
            xa[mt][h][4 * j + 2] = t.real ? v.z : 0u, xa[mt][h][4 * j + 3] = t.real ? v.w : 0u;
          }
        }
      }
#pragma unroll
    for (int s = 0; s < QUADS; s++)
#pragma unroll
      for (int nt = 0; nt < AM_NT; nt++) {
        uint32_t lo, hi;
        dequant_quad<BITS, WIDE>(t.words[nt][i], s, t.s2[nt], t.b2[nt], t.sf[nt], t.bf[nt], lo, hi);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          const uint32_t a[4] = {xa[mt][0][2 * s], xa[mt][1][2 * s], xa[mt][0][2 * s + 1], xa[mt][1][2 * s + 1]};
          mma_bf16(acc[mt][nt], a, lo, hi);
        }
      }
  }
}

// MT: tiles of 16 input rows a block. x: bf16 [rows, k] in quad order, rows padded to whole
// blocks (weights.rs); k a multiple of 32. Warp w takes weight rows r0 + 8·AM_NT·w.. and
// every span of the block's part of k (grid z: spans [z·span_split, (z + 1)·span_split)).
template <int BITS, int MT, typename S>
__device__ void affine_mma(const uint32_t* w, const S* scales, const S* biases, float* y, int n,
                           const __nv_bfloat16* x, int k, int group, int M, int span_split) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, gid = lane / 4, tid = lane % 4;
  const int m0 = blockIdx.x * 16 * MT, r0 = blockIdx.y * AM_ROWS + warp * 8 * AM_NT;
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  const int spans = (chunks + AM_SPAN - 1) / AM_SPAN;
  const int sp_begin = blockIdx.z * span_split, sp_end = min(spans, sp_begin + span_split);
  // This lane's weight rows (a missing last row repeats the one before, unwritten).
  int rows[AM_NT];
#pragma unroll
  for (int nt = 0; nt < AM_NT; nt++) rows[nt] = min(r0 + 8 * nt + gid, n - 1);

  float acc[MT][AM_NT][4] = {};
  AmSpan<BITS> cur, next;  // the next span's weights load while this one's multiply
  if (sp_begin < sp_end) am_load<BITS>(cur, w, scales, biases, rows, sp_begin, chunks, groups, chunks_per_group);
  // The weights are in flight; x is the previous kernel's. (No PDL_NEXT: letting the next
  // kernel in early cost the int8 GEMM this replaced 10 % at 32 rows.)
  PDL_WAIT();
  for (int sp = sp_begin; sp < sp_end; sp++) {
    if (sp + 1 < sp_end) am_load<BITS>(next, w, scales, biases, rows, sp + 1, chunks, groups, chunks_per_group);
    am_multiply<BITS, am_wide<BITS, S>, MT>(acc, cur, x, m0, k);
    cur = next;
  }
  // acc[mt][nt][q]: input row m0 + 16·mt + gid + 8·(q / 2), weight row r0 + 8·nt + 2·tid + q % 2.
  float* out = y + (long)blockIdx.z * M * n;
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < AM_NT; nt++)
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const int in = m0 + 16 * mt + gid + 8 * (q / 2), row = r0 + 8 * nt + 2 * tid + q % 2;
        if (in < M && row < n) out[(long)in * n + row] = acc[mt][nt][q];
      }
}

// Grid (ceil(M / (16·MT)), ceil(n / AM_ROWS), parts), AM_RW warps a block.
#define AFFINE_MMA(BITS, SNAME, S, MT)                                                                 \
  extern "C" __global__ void __launch_bounds__(AM_RW* WARP)                                         \
      affine_mma_##BITS##_##SNAME##_t##MT(const uint32_t* w, const S* sc, const S* bi, float* y, int n, \
                                          const __nv_bfloat16* x, int k, int group, int M,             \
                                          int span_split) {                                            \
    affine_mma<BITS, MT, S>(w, sc, bi, y, n, x, k, group, M, span_split);                             \
  }
// Tiles of 16 input rows a block: 1, 2 or 4.
#define AFFINE_MMA_T(BITS, SNAME, S) AFFINE_MMA(BITS, SNAME, S, 1) AFFINE_MMA(BITS, SNAME, S, 2) AFFINE_MMA(BITS, SNAME, S, 4)
#define AFFINE_MMA_ALL(BITS) \
  AFFINE_MMA_T(BITS, f32, float) AFFINE_MMA_T(BITS, f16, __half) AFFINE_MMA_T(BITS, bf16, __nv_bfloat16)
AFFINE_MMA_ALL(2)
AFFINE_MMA_ALL(4)
AFFINE_MMA_ALL(8)

// y[i] = Σ_z parts[z][i], z in order, over `len` values and `count` parts (a GEMM's sums
// over parts of k).
extern "C" __global__ void sum_parts(const float* parts, float* y, long len, int count) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < len; i += (long)gridDim.x * blockDim.x) {
    float t = 0.f;
    for (int z = 0; z < count; z++) t += parts[z * len + i];
    y[i] = t;
  }
}

// The input of `affine_mma`: y = bf16(x), each quad [x0, x1, x2, x3] stored as [x0, x2, x1,
// x3].
extern "C" __global__ void cast_f32_bf16_quads(const float4* x, uint2* y, long quads) {
  PDL_ENTER();
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < quads; i += (long)gridDim.x * blockDim.x) {
    const float4 v = x[i];
    y[i] = make_uint2(bf16x2_of(v.x, v.z), bf16x2_of(v.y, v.w));
  }
}

// Long prompts (weights.rs `DEQUANT_MIN_ROWS` rows of input and more): rows [r0, r0 + rows)
// of weights in the integer layout, dequantized to bf16 for cuBLAS's tensor-core GEMM:
// out[r - r0, :] = bf16(scale·q + bias), a slice of rows at a time (weights.rs
// `DEQUANT_SLICE_BYTES`). One thread per chunk of 32 codes, written as four 16-byte stores.
template <int BITS, typename S>
__device__ void int_dequant(const uint32_t* w, const S* scales, const S* biases, __nv_bfloat16* out,
                            int r0, int rows, int k, int group) {
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  constexpr int per_word = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < (long)rows * chunks;
       t += (long)gridDim.x * blockDim.x) {
    const long r = r0 + t / chunks;
    const int c = t % chunks, g = c / chunks_per_group;
    uint32_t words[BITS];
    load_chunk<BITS>(w + (r * chunks + c) * BITS, words);
    const float s = to_f32(scales[r * groups + g]), b = to_f32(biases[r * groups + g]);
    // Code i·per_word + 4·sft + j is byte j of word i shifted down by BITS·sft (`chunk_dot`).
    float v[32];
#pragma unroll
    for (int i = 0; i < BITS; i++)
#pragma unroll
      for (int sft = 0; sft < per_word / 4; sft++)
#pragma unroll
        for (int j = 0; j < 4; j++)
          v[i * per_word + 4 * sft + j] = s * (float)((words[i] >> (BITS * sft + 8 * j)) & mask) + b;
    __align__(16) __nv_bfloat162 pairs[16];
#pragma unroll
    for (int p = 0; p < 16; p++) pairs[p] = __floats2bfloat162_rn(v[2 * p], v[2 * p + 1]);
    uint4* o = reinterpret_cast<uint4*>(out + t * 32);  // row r - r0, chunk c
#pragma unroll
    for (int q = 0; q < 4; q++) o[q] = reinterpret_cast<const uint4*>(pairs)[q];
  }
}

#define INT_DEQUANT(BITS, SNAME, S)                                                                 \
  extern "C" __global__ void int_dequant_##BITS##_##SNAME(const uint32_t* w, const S* sc, const S* bi, \
                                                          __nv_bfloat16* out, int r0, int rows, int k, \
                                                          int group) {                              \
    PDL_ENTER();                                                                                    \
    int_dequant<BITS, S>(w, sc, bi, out, r0, rows, k, group);                                       \
  }
#define INT_DEQUANT_ALL(BITS) \
  INT_DEQUANT(BITS, f32, float) INT_DEQUANT(BITS, f16, __half) INT_DEQUANT(BITS, bf16, __nv_bfloat16)
INT_DEQUANT_ALL(2)
INT_DEQUANT_ALL(4)
INT_DEQUANT_ALL(8)

// More than 8 rows of input, codes in MLX's layout: W expanded to f32 [n, k] (then a cuBLAS
// GEMM). One thread per chunk.
template <int BITS, typename S>
__device__ void affine_dequant(const uint32_t* w, const S* scales, const S* biases, float* out, int n,
                               int k, int group) {
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  const long total = (long)n * chunks;
  for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
    const long r = t / chunks;
    const int c = t % chunks;
    uint32_t words[BITS];
    load_chunk<BITS>(w + t * BITS, words);
    const int g = c / chunks_per_group;
    const float s = to_f32(scales[r * groups + g]), b = to_f32(biases[r * groups + g]);
    float* o = out + r * k + c * 32;
#pragma unroll
    for (int j = 0; j < 32; j++) o[j] = s * code<BITS>(words, j) + b;
  }
}

// MLX's layout: the f32 GEMV (3, 5 and 6 bits, whose codes straddle words) and the
// dequantizer.
#define AFFINE(BITS, SNAME, S)                                                                      \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)                                    \
      affine_gemv_##BITS##_##SNAME(const uint32_t* w, const S* sc, const S* bi, const float* x,      \
                                   float* y, int n, int k, int group, int M) {                      \
    PDL_ENTER();                                                                                    \
    affine_gemv<BITS, S>(w, sc, bi, x, y, n, k, group, M);                                          \
  }                                                                                                 \
  extern "C" __global__ void affine_dequant_##BITS##_##SNAME(const uint32_t* w, const S* sc,        \
                                                             const S* bi, float* out, int n, int k, \
                                                             int group) {                           \
    PDL_ENTER();                                                                                    \
    affine_dequant<BITS, S>(w, sc, bi, out, n, k, group);                                           \
  }
#define AFFINE_ALL(BITS) \
  AFFINE(BITS, f32, float) AFFINE(BITS, f16, __half) AFFINE(BITS, bf16, __nv_bfloat16)
AFFINE_ALL(3)
AFFINE_ALL(5)
AFFINE_ALL(6)

// ---------------------------------------------------------------------------------------
// Embeddings: out[r, :] = row ids[r] of a table [vocab, k], dequantized to f32 (a table of
// floats takes `gather_rows`). One thread per (row, chunk of 32 values). Affine codes in MLX's layout (weights.rs `GpuEmbedding`),
// computed as the CPU computes them (scale · code, rounded, + bias, rounded: no fused
// multiply-add), so the GPU's embeddings are the CPU's exactly.
template <int BITS, typename S>
__device__ void embed_affine(const uint32_t* w, const S* scales, const S* biases, const unsigned* ids,
                             float* out, int n, int k, int group) {
  const int chunks = k / 32, groups = k / group, chunks_per_group = group / 32;
  for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < (long)n * chunks;
       t += (long)gridDim.x * blockDim.x) {
    const long r = t / chunks, id = ids[r];
    const int c = t % chunks, g = c / chunks_per_group;
    uint32_t words[BITS];
    load_chunk<BITS>(w + (id * chunks + c) * BITS, words);
    const float s = to_f32(scales[id * groups + g]), b = to_f32(biases[id * groups + g]);
    float* o = out + r * k + c * 32;
#pragma unroll
    for (int j = 0; j < 32; j++) o[j] = __fadd_rn(__fmul_rn(s, code<BITS>(words, j)), b);
  }
}

#define EMBED_AFFINE(BITS, SNAME, S)                                                                 \
  extern "C" __global__ void embed_affine_##BITS##_##SNAME(const uint32_t* w, const S* sc,          \
                                                           const S* bi, const unsigned* ids,        \
                                                           float* out, int n, int k, int group) {   \
    PDL_ENTER();                                                                                    \
    embed_affine<BITS, S>(w, sc, bi, ids, out, n, k, group);                                         \
  }
#define EMBED_AFFINE_ALL(BITS)                                                                     \
  EMBED_AFFINE(BITS, f32, float) EMBED_AFFINE(BITS, f16, __half) EMBED_AFFINE(BITS, bf16, __nv_bfloat16)
EMBED_AFFINE_ALL(2)
EMBED_AFFINE_ALL(3)
EMBED_AFFINE_ALL(4)
EMBED_AFFINE_ALL(5)
EMBED_AFFINE_ALL(6)
EMBED_AFFINE_ALL(8)

// ---------------------------------------------------------------------------------------
// Prompt attention on the tensor cores (flash-attention 2's scheme), for the spans of a pass
// with at least PA_MIN_ROWS rows (ops.rs `PromptRows`; the flash-decoding kernel above takes
// the other rows): causal over positions [0, qpos], every key already in the cache (the
// RoPE kernel stored the pass's), no sliding window and no ring, head_dim == D. The
// flash-decoding kernel reads each key once per row of the prompt, in f32 FMAs; here 64
// rows share each load and the products run as mma.m16n8k16 (T × T → f32). H100, bf16
// Llama shapes, one layer's attention in a pass of 256 rows (synchronized, op by op): 1B
// (head 64) 113 → 45 µs at positions up to 512 and 349 → 101 µs up to 2,048; 8B (head 128)
// 190 → 60 µs up to 512.
//
// Grid (tiles, heads), PA_WARPS warps. A tile is up to PA_ROWS consecutive rows of one
// sequence (`tiles[2t]` its first row, `tiles[2t + 1]` its rows); warp w takes rows 16w to
// 16w + 15 of it, each lane rows lane/4 and lane/4 + 8 of those (the mma's C layout), and
// the block one query head. Per PA_KEYS keys: keys and values from the cache into shared
// memory, the scores S = Q·Kᵀ, the online softmax in registers (exp2, with the scale
// folded in), O += P·V. The queries and P enter the mma as two T values each, the rounded
// value and what rounding left (`split2`), and the products are summed in f32: as exact
// as the flash-decoding kernel's f32 arithmetic over the cache's keys and values. (Rounded
// once, an f16 cache's 160-row prompt in the GPU tests turned a top-1 whose lead was 0.62;
// the second mma costs little here.)
#define PA_WARPS 4
#define PA_ROWS (16 * PA_WARPS)
#define PA_KEYS 64

__device__ __forceinline__ void mma_t(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                      __nv_bfloat16) {
  mma_bf16(c, a, b0, b1);
}
__device__ __forceinline__ void mma_t(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (lo, hi) rounded to T and packed, lo in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) { return bf16x2_of(lo, hi); }
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float2 unpack2(uint32_t p, __nv_bfloat16) {
  return make_float2(__uint_as_float(p << 16), __uint_as_float(p & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t p, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&p));
}
// (lo, hi) as two packed pairs of T whose sum is them to T's precision squared.
template <typename T>
__device__ __forceinline__ void split2(float lo, float hi, uint32_t& big, uint32_t& rest) {
  big = pack2(lo, hi, T());
  const float2 b = unpack2(big, T());
  rest = pack2(lo - b.x, hi - b.y, T());
}

// Four 8×8 matrices of 16-bit values from shared memory, lane l giving the address of row
// l % 8 of matrix l / 8; `.trans` hands each lane a column pair instead of a row pair.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T, int D>
__device__ void prompt_attention(const float* q, const T* cache_k, const T* cache_v, const unsigned* tables,
                                 const RowMeta* meta, const int* tiles, float* out, int heads, int kv_heads,
                                 int block_size, float scale) {
  // A key's row in shared memory, padded by 16 bytes: the 8 rows an ldmatrix reads at once
  // then start in different banks.
  constexpr int STRIDE = D + 8;
  __shared__ __align__(16) T s_k[PA_KEYS * STRIDE];
  __shared__ __align__(16) T s_v[PA_KEYS * STRIDE];
  const int h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int row0 = tiles[2 * blockIdx.x], nrows = tiles[2 * blockIdx.x + 1];
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, quad = lane % 4;
  const RowMeta m = meta[row0];
  const int last = m.qpos + nrows - 1;  // the tile's last position: keys past it are unseen
  // This lane's two rows in the tile (past `nrows`: computed, never stored).
  const int ra = 16 * warp + lane / 4, rb = ra + 8;
  const int pa = m.qpos + ra, pb = m.qpos + rb, warp_last = m.qpos + 16 * warp + 15;

  // The queries as A fragments (rounded, and what rounding left): k-step s holds
  // dimensions 16s..16s+15.
  uint32_t qf[D / 16][4], ql[D / 16][4];
  {
    const float* qa = q + ((long)(row0 + min(ra, nrows - 1)) * heads + h) * D + 2 * quad;
    const float* qb = q + ((long)(row0 + min(rb, nrows - 1)) * heads + h) * D + 2 * quad;
#pragma unroll
    for (int s = 0; s < D / 16; s++) {
      const float2 a0 = *reinterpret_cast<const float2*>(qa + 16 * s);
      const float2 a1 = *reinterpret_cast<const float2*>(qb + 16 * s);
      const float2 a2 = *reinterpret_cast<const float2*>(qa + 16 * s + 8);
      const float2 a3 = *reinterpret_cast<const float2*>(qb + 16 * s + 8);
      split2<T>(a0.x, a0.y, qf[s][0], ql[s][0]), split2<T>(a1.x, a1.y, qf[s][1], ql[s][1]);
      split2<T>(a2.x, a2.y, qf[s][2], ql[s][2]), split2<T>(a3.x, a3.y, qf[s][3], ql[s][3]);
    }
  }
  float o[D / 8][4];
#pragma unroll
  for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
  const float scale2 = scale * 1.4426950408889634f;  // scores in log2 units

  for (int k0 = 0; k0 <= last; k0 += PA_KEYS) {
    __syncthreads();  // every warp is done with the previous keys
    for (int i = threadIdx.x; i < PA_KEYS * D / 8; i += blockDim.x) {
      const int key = i / (D / 8), c = 8 * (i % (D / 8)), p = k0 + key;
      uint4 kk = make_uint4(0, 0, 0, 0), vv = kk;  // past the last: zeros (0 · weight 0)
      if (p <= last) {
        const long block = tables[m.table_offset + p / block_size];
        const long at = cache_at(block, p, kvh, kv_heads, block_size, D) + c;
        kk = *reinterpret_cast<const uint4*>(cache_k + at);
        vv = *reinterpret_cast<const uint4*>(cache_v + at);
      }
      *reinterpret_cast<uint4*>(s_k + key * STRIDE + c) = kk;
      *reinterpret_cast<uint4*>(s_v + key * STRIDE + c) = vv;
    }
    __syncthreads();
    if (k0 > warp_last) continue;  // every key here is past this warp's rows

    // Scores of 8 keys an n-tile; ldmatrix's four matrices are two n-tiles' B fragments
    // (keys n·8.., dimensions 16s.. and 16s + 8..).
    float sc[PA_KEYS / 8][4];
#pragma unroll
    for (int n = 0; n < PA_KEYS / 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
    const int mi = lane / 8, mr = lane % 8;
#pragma unroll
    for (int s = 0; s < D / 16; s++)
#pragma unroll
      for (int n = 0; n < PA_KEYS / 8; n += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, s_k + ((n + (mi >> 1)) * 8 + mr) * STRIDE + 16 * s + 8 * (mi & 1));
        mma_t(sc[n], qf[s], b[0], b[1], T());
        mma_t(sc[n], ql[s], b[0], b[1], T());
        mma_t(sc[n + 1], qf[s], b[2], b[3], T());
        mma_t(sc[n + 1], ql[s], b[2], b[3], T());
      }

    // The online softmax of rows a (elements 0, 1 of an n-tile) and b (2, 3).
    float top[2] = {mx[0], mx[1]};
#pragma unroll
    for (int n = 0; n < PA_KEYS / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = k0 + 8 * n + 2 * quad + (e & 1);
        sc[n][e] = key <= (e < 2 ? pa : pb) ? sc[n][e] * scale2 : -INFINITY;
        top[e / 2] = fmaxf(top[e / 2], sc[n][e]);
      }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffff, top[r], 1));
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffff, top[r], 2));
      base[r] = top[r] == -INFINITY ? 0.f : top[r];  // no key yet: every weight is 0
      const float correction = exp2f(mx[r] - base[r]);  // 0 while mx is -inf
      mx[r] = top[r];
      sum[r] *= correction;
#pragma unroll
      for (int d = 0; d < D / 8; d++) o[d][2 * r] *= correction, o[d][2 * r + 1] *= correction;
    }
#pragma unroll
    for (int n = 0; n < PA_KEYS / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        sc[n][e] = exp2f(sc[n][e] - base[e / 2]);
        sum[e / 2] += sc[n][e];
      }

    // O += P·V, 16 keys a k-step: the scores' C fragments of n-tiles 2j and 2j + 1 are the
    // A fragment of k-step j; ldmatrix.trans gives two dimension n-tiles' B fragments.
#pragma unroll
    for (int j = 0; j < PA_KEYS / 16; j++) {
      uint32_t a[4], al[4];
      split2<T>(sc[2 * j][0], sc[2 * j][1], a[0], al[0]), split2<T>(sc[2 * j][2], sc[2 * j][3], a[1], al[1]);
      split2<T>(sc[2 * j + 1][0], sc[2 * j + 1][1], a[2], al[2]);
      split2<T>(sc[2 * j + 1][2], sc[2 * j + 1][3], a[3], al[3]);
#pragma unroll
      for (int d = 0; d < D / 8; d += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, s_v + (16 * j + 8 * (mi & 1) + mr) * STRIDE + 8 * (d + (mi >> 1)));
        mma_t(o[d], a, b[0], b[1], T());
        mma_t(o[d], al, b[0], b[1], T());
        mma_t(o[d + 1], a, b[2], b[3], T());
        mma_t(o[d + 1], al, b[2], b[3], T());
      }
    }
  }

  // Each row's sum over its quad's lanes, then the outputs: lane holds dimensions
  // 8d + 2·quad and the next of rows a and b.
#pragma unroll
  for (int r = 0; r < 2; r++) {
    sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffff, sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = r == 0 ? ra : rb;
    if (row >= nrows) continue;
    float* dst = out + ((long)(row0 + row) * heads + h) * D + 2 * quad;
#pragma unroll
    for (int d = 0; d < D / 8; d++)
      *reinterpret_cast<float2*>(dst + 8 * d) = make_float2(o[d][2 * r] / sum[r], o[d][2 * r + 1] / sum[r]);
  }
}

#define PROMPT_ATTENTION(NAME, T, D)                                                               \
  extern "C" __global__ void __launch_bounds__(PA_WARPS* WARP)                                    \
      NAME(const float* q, const T* cache_k, const T* cache_v, const unsigned* tables,             \
           const RowMeta* meta, const int* tiles, float* out, int heads, int kv_heads,             \
           int block_size, float scale) {                                                          \
    PDL_ENTER();                                                                                   \
    prompt_attention<T, D>(q, cache_k, cache_v, tables, meta, tiles, out, heads, kv_heads,        \
                           block_size, scale);                                                     \
  }
PROMPT_ATTENTION(prompt_attention_f16_64, __half, 64)
PROMPT_ATTENTION(prompt_attention_f16_128, __half, 128)
PROMPT_ATTENTION(prompt_attention_bf16_64, __nv_bfloat16, 64)
PROMPT_ATTENTION(prompt_attention_bf16_128, __nv_bfloat16, 128)
