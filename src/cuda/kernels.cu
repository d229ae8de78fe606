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
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    x[i] += b ? a[i] + b[i] : a[i];
}

extern "C" __global__ void scale_f32(float* x, float s, long n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    x[i] *= s;
}

// y[r, c] += bias[c] over `rows` rows of `cols`.
extern "C" __global__ void add_bias_f32(float* y, const float* bias, long rows, int cols) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < rows * cols; i += (long)gridDim.x * blockDim.x)
    y[i] += bias[i % cols];
}

// The CPU's formulas (layers.rs `Activation::of`).
__device__ __forceinline__ float act(int kind, float x) {
  if (kind == 0) return x / (1.f + expf(-x));  // SiLU
  const float k = 0.7978846f;                   // tanh-approximated GELU
  return 0.5f * x * (1.f + tanhf(k * x * (1.f + 0.044715f * x * x)));
}

// gate = act(gate) * up (up == NULL: gate = act(gate)).
extern "C" __global__ void activation_f32(float* gate, const float* up, int kind, long n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const float a = act(kind, gate[i]);
    gate[i] = up ? a * up[i] : a;
  }
}

// out[i, :] = x[rows[i], :].
extern "C" __global__ void gather_rows_f32(const float* x, const unsigned* rows, int width, float* out,
                                           int n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)n * width; i += (long)gridDim.x * blockDim.x)
    out[i] = x[(long)rows[i / width] * width + i % width];
}

// out[rows[i], :] += weights[i] * y[i, :] (the rows are distinct: one expert's tokens).
extern "C" __global__ void scatter_add_rows_f32(float* out, const float* y, const unsigned* rows,
                                                const float* weights, int width, int n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (long)n * width; i += (long)gridDim.x * blockDim.x)
    out[(long)rows[i / width] * width + i % width] += weights[i / width] * y[i];
}

extern "C" __global__ void cast_f32_bf16(const float* x, __nv_bfloat16* y, long n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_f32_f16(const float* x, __half* y, long n) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

// ---------------------------------------------------------------------------------------
// Norms: one block per row of `d` (layers.rs `Norm::apply`: x / sqrt(mean(x²) + eps) · w,
// or LayerNorm with a bias).

extern "C" __global__ void rms_norm_f32(float* x, const float* w, float eps, int d) {
  float* row = x + (long)blockIdx.x * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += row[i] * row[i];
  const float m = sqrtf(block_sum(s) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = row[i] / m * w[i];
}

extern "C" __global__ void layer_norm_f32(float* x, const float* w, const float* b, float eps, int d) {
  float* row = x + (long)blockIdx.x * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += row[i];
  const float mean = block_sum(s) / d;
  float v = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) v += (row[i] - mean) * (row[i] - mean);
  const float std = sqrtf(block_sum(v) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = (row[i] - mean) / std * w[i] + b[i];
}

// ---------------------------------------------------------------------------------------
// RoPE (layers.rs `Rope::rotate`) on x: [rows, heads, head_dim], row r at positions[r];
// one thread per (row, head, frequency i < half). The angle is taken in double, as on the
// CPU, so long contexts stay accurate.
extern "C" __global__ void rope_f32(float* x, const int* positions, const float* inv_freq, int half_,
                                    int heads, int head_dim, int interleaved, float scale, int rows) {
  const long n = (long)rows * heads * half_;
  for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
    const int i = t % half_;
    const long rh = t / half_;
    const int row = rh / heads;
    double s, c;
    sincos((double)positions[row] * (double)inv_freq[i], &s, &c);
    const float cs = (float)c * scale, sn = (float)s * scale;
    float* head = x + rh * head_dim;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half_;
    const float u = head[a], v = head[b];
    head[a] = u * cs - v * sn;
    head[b] = u * sn + v * cs;
  }
}

// ---------------------------------------------------------------------------------------
// Paged attention.
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
// Grid (rows, heads), 512 threads: 16 warps take every 16th key, lane l holds dimensions
// l, l + 32, ... of the query and the accumulated value; an online softmax per warp, then
// the warps merge through shared memory.

#define ATT_WARPS 16
#define MAX_HD_PER_LANE 8  // head_dim <= 256

struct RowMeta {
  int qpos, start, seq_row, table_offset;
};

template <typename T>
__device__ void attention(const float* q, const float* k, const float* v, const T* cache_k,
                          const T* cache_v, const unsigned* tables, const RowMeta* meta, float* out,
                          int heads, int kv_heads, int head_dim, int block_size, float scale,
                          int window, int ring_keep, int ring_window) {
  const int row = blockIdx.x, head = blockIdx.y;
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int kvh = head / (heads / kv_heads);
  const RowMeta m = meta[row];
  const int per_lane = (head_dim + WARP - 1) / WARP;

  float qv[MAX_HD_PER_LANE], acc[MAX_HD_PER_LANE];
#pragma unroll
  for (int i = 0; i < MAX_HD_PER_LANE; i++) {
    const int d = lane + i * WARP;
    qv[i] = (i < per_lane && d < head_dim) ? q[((long)row * heads + head) * head_dim + d] * scale : 0.f;
    acc[i] = 0.f;
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

  float mx = -INFINITY, sum = 0.f;
  for (int j = warp; j < n; j += ATT_WARPS) {
    const int p = j < n_kept ? first + j : recent_start + (j - n_kept);
    float kd[MAX_HD_PER_LANE], vd[MAX_HD_PER_LANE];
    if (p >= m.start) {
      const long base = ((long)(m.seq_row + p - m.start) * kv_heads + kvh) * head_dim;
#pragma unroll
      for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        const int d = lane + i * WARP;
        const bool ok = i < per_lane && d < head_dim;
        kd[i] = ok ? to_f32(from_f32<T>(k[base + d])) : 0.f;
        vd[i] = ok ? to_f32(from_f32<T>(v[base + d])) : 0.f;
      }
    } else {
      const int slot = (ring_window > 0 && p >= ring_keep) ? ring_keep + (p - ring_keep) % ring_window : p;
      const long block = tables[m.table_offset + slot / block_size];
      const long base = ((block * kv_heads + kvh) * block_size + slot % block_size) * head_dim;
#pragma unroll
      for (int i = 0; i < MAX_HD_PER_LANE; i++) {
        const int d = lane + i * WARP;
        const bool ok = i < per_lane && d < head_dim;
        kd[i] = ok ? to_f32(cache_k[base + d]) : 0.f;
        vd[i] = ok ? to_f32(cache_v[base + d]) : 0.f;
      }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) s += qv[i] * kd[i];
    s = warp_sum(s);
    const float new_mx = fmaxf(mx, s);
    const float correction = expf(mx - new_mx), w = expf(s - new_mx);
    sum = sum * correction + w;
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) acc[i] = acc[i] * correction + w * vd[i];
    mx = new_mx;
  }
  // Merge the warps' partial softmaxes (a warp without keys has sum 0 and takes no part).
  __shared__ float s_mx[ATT_WARPS], s_sum[ATT_WARPS];
  __shared__ float s_acc[ATT_WARPS][MAX_HD_PER_LANE * WARP];
  if (lane == 0) {
    s_mx[warp] = mx;
    s_sum[warp] = sum;
  }
#pragma unroll
  for (int i = 0; i < MAX_HD_PER_LANE; i++) s_acc[warp][lane + i * WARP] = acc[i];
  __syncthreads();
  if (warp == 0) {
    float gmx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++)
      if (s_sum[w] > 0.f) gmx = fmaxf(gmx, s_mx[w]);
    float total = 0.f, o[MAX_HD_PER_LANE] = {0.f};
    for (int w = 0; w < ATT_WARPS; w++) {
      if (s_sum[w] <= 0.f) continue;
      const float f = expf(s_mx[w] - gmx);
      total += f * s_sum[w];
#pragma unroll
      for (int i = 0; i < MAX_HD_PER_LANE; i++) o[i] += f * s_acc[w][lane + i * WARP];
    }
#pragma unroll
    for (int i = 0; i < MAX_HD_PER_LANE; i++) {
      const int d = lane + i * WARP;
      if (i < per_lane && d < head_dim) out[((long)row * heads + head) * head_dim + d] = o[i] / total;
    }
  }
}

#define ATTENTION(NAME, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(ATT_WARPS* WARP)                                     \
      NAME(const float* q, const float* k, const float* v, const T* cache_k, const T* cache_v,      \
           const unsigned* tables, const RowMeta* meta, float* out, int heads, int kv_heads,        \
           int head_dim, int block_size, float scale, int window, int ring_keep, int ring_window) { \
    attention<T>(q, k, v, cache_k, cache_v, tables, meta, out, heads, kv_heads, head_dim,           \
                 block_size, scale, window, ring_keep, ring_window);                                \
  }
ATTENTION(attention_f16, __half)
ATTENTION(attention_bf16, __nv_bfloat16)

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
    const long dst = (((slot / block_size) * kv_heads + h) * block_size + slot % block_size) * head_dim + d;
    cache_k[dst] = from_f32<T>(k[i]);
    cache_v[dst] = from_f32<T>(v[i]);
  }
}

extern "C" __global__ void kv_store_f16(const float* k, const float* v, __half* ck, __half* cv,
                                        const long* slots, int rows, int kv_heads, int head_dim,
                                        int block_size) {
  kv_store(k, v, ck, cv, slots, rows, kv_heads, head_dim, block_size);
}

extern "C" __global__ void kv_store_bf16(const float* k, const float* v, __nv_bfloat16* ck,
                                         __nv_bfloat16* cv, const long* slots, int rows, int kv_heads,
                                         int head_dim, int block_size) {
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

// Decode GEMV, y[m, :] = x[m, :] · Wᵀ for m < M <= 8: each warp takes GEMV_ROWS
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

// Decode GEMV over a float matrix (bf16 or f16 weights, f32 activations, f32 sums), the
// same shape of work as the affine one: 2 rows per warp, lane l takes 8 values at a time
// (one 16-byte load per row). k is a multiple of 8.
template <typename W>
__device__ void dense_gemv(const W* w, const float* x, float* y, int n, int k, int M) {
  const int lane = threadIdx.x % WARP;
  const int r0 = (blockIdx.x * GEMV_WARPS + threadIdx.x / WARP) * GEMV_ROWS;
  if (r0 >= n) return;
  float acc[GEMV_ROWS][8] = {};
  const int octets = k / 8;
#pragma unroll 2
  for (int c = lane; c < octets; c += WARP) {
    float wv[GEMV_ROWS][8];
#pragma unroll
    for (int rr = 0; rr < GEMV_ROWS; rr++) {
      const int r = min(r0 + rr, n - 1);
      const uint4 raw = *reinterpret_cast<const uint4*>(w + (long)r * k + c * 8);
      const W* v = reinterpret_cast<const W*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; j++) wv[rr][j] = to_f32(v[j]);
    }
#pragma unroll
    for (int mm = 0; mm < 8; mm++) {
      if (mm >= M) break;
      const float4* xp = reinterpret_cast<const float4*>(x + (long)mm * k + c * 8);
      const float4 a = xp[0], b = xp[1];
#pragma unroll
      for (int rr = 0; rr < GEMV_ROWS; rr++)
        acc[rr][mm] += wv[rr][0] * a.x + wv[rr][1] * a.y + wv[rr][2] * a.z + wv[rr][3] * a.w +
                       wv[rr][4] * b.x + wv[rr][5] * b.y + wv[rr][6] * b.z + wv[rr][7] * b.w;
    }
  }
  gemv_store(acc, y, n, r0, M, lane);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)
    dense_gemv_bf16(const __nv_bfloat16* w, const float* x, float* y, int n, int k, int M) {
  dense_gemv(w, x, y, n, k, M);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)
    dense_gemv_f16(const __half* w, const float* x, float* y, int n, int k, int M) {
  dense_gemv(w, x, y, n, k, M);
}

// Prefill: W expanded to f32 [n, k] (then a cuBLAS GEMM). One thread per chunk.
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

#define AFFINE(BITS, SNAME, S)                                                                       \
  extern "C" __global__ void __launch_bounds__(GEMV_WARPS* WARP)                                     \
      affine_gemv_##BITS##_##SNAME(const uint32_t* w, const S* sc, const S* bi, const float* x,       \
                                   float* y, int n, int k, int group, int M) {                       \
    affine_gemv<BITS, S>(w, sc, bi, x, y, n, k, group, M);                                           \
  }                                                                                                  \
  extern "C" __global__ void affine_dequant_##BITS##_##SNAME(const uint32_t* w, const S* sc,         \
                                                             const S* bi, float* out, int n, int k, \
                                                             int group) {                            \
    affine_dequant<BITS, S>(w, sc, bi, out, n, k, group);                                            \
  }
#define AFFINE_ALL(BITS) \
  AFFINE(BITS, f32, float) AFFINE(BITS, f16, __half) AFFINE(BITS, bf16, __nv_bfloat16)
AFFINE_ALL(2)
AFFINE_ALL(3)
AFFINE_ALL(4)
AFFINE_ALL(5)
AFFINE_ALL(6)
AFFINE_ALL(8)
