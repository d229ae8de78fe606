"""The quantized GEMM (`affine_mma_*`) and GEMV (`q8_gemv_*`) of src/cuda/kernels.cu on random
data, without the rest of Cortex, and the long prompts' path (`int_dequant_*` a slice of rows at
a time, then cuBLAS in bf16): exactness against float64 evaluations of what each computes (the
GEMV: the same integer sums; the GEMM: bf16 weights and inputs; the long prompts' path: the
float64 product, within bf16's rounding), then the time per shape (replayed from a CUDA graph,
so no launch overhead, cycling through copies of the weights so that they come from memory), in
TB/s of weights and TFLOPS. Needs CuPy and the kernels compiled for the GPU at hand:

    nvcc -cubin -arch=sm_90 src/cuda/kernels.cu -o /tmp/k.cubin
    python benches/gpu_kernels.py /tmp/k.cubin 4      # 2, 4 or 8-bit codes, bf16 scales
    python benches/gpu_kernels.py /tmp/k.cubin 4 16,32  # timings at these rows of input only
"""

import sys

import cupy as cp
import numpy as np
from cupy_backends.cuda.libs import cublas

mod = cp.RawModule(path=sys.argv[1])
BITS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
ROWS = [int(r) for r in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 8, 16, 32, 64, 128, 256, 512]
rng = np.random.default_rng(0)
SMS = cp.cuda.Device().attributes["MultiProcessorCount"]


def make(n, k, group):
    words = rng.integers(0, 2**32, size=(n, k * BITS // 32), dtype=np.uint64).astype(np.uint32)
    scales = (rng.standard_normal((n, k // group)) * 0.01).astype(np.float32)
    biases = (rng.standard_normal((n, k // group)) * 0.05).astype(np.float32)
    return words, _bf16(scales), _bf16(biases)


def _bf16(a):
    return (a.view(np.uint32) >> 16).astype(np.uint16)  # truncated: then exact in bf16


def codes(words, k):
    n = words.shape[0]
    per_word = 32 // BITS
    w = words.reshape(n, k // per_word).astype(np.int64)
    out = np.zeros((n, k // per_word, per_word), np.int64)
    for s in range(per_word // 4):
        for j in range(4):
            out[:, :, 4 * s + j] = (w >> (BITS * s + 8 * j)) & ((1 << BITS) - 1)
    return out.reshape(n, k)


def launch(name, grid, block, args):
    mod.get_function(name)(grid, block, args)


def quantize(x):
    m, k = x.shape
    xq = cp.zeros((m, k), cp.int8)
    ds = cp.zeros((m, k // 32, 2), cp.float32)
    blocks = m * k // 32
    launch("quantize_q8", (-(-blocks // 8),), (256,), (x, xq, ds, np.int64(blocks)))
    return xq, ds


def cast_quads(x):
    """weights.rs `to_quads`: x in bf16, each quad [x0, x1, x2, x3] as [x0, x2, x1, x3], rows
    padded to whole blocks of 64."""
    m, k = x.shape
    xh = cp.zeros((-(-m // 64) * 64, k), cp.uint16)
    launch("cast_f32_bf16_quads", (-(-m * k // 4 // 256),), (256,), (x, xh, np.int64(m * k // 4)))
    return xh


def mma_launcher(w, s, b, xh, m, n, k, group, parts=None):
    """A function launching the GEMM (and the sum of its parts) into buffers of its own; parts
    as weights.rs `affine_mma` chooses them unless given."""
    spans = -(-k // 32 // 4)
    tiles = 1 if m <= 16 else 2 if m <= 32 else 4
    blocks = -(-m // (16 * tiles)) * -(-n // 128)
    if parts is None:
        parts = 1 if blocks >= SMS else max(1, min(-(-2 * SMS // blocks), max(1, spans // 2)))
    split = -(-spans // parts)
    parts = -(-spans // split)
    y = cp.zeros((parts, m, n), cp.float32)
    out = y[0] if parts == 1 else cp.empty((m, n), cp.float32)
    f = mod.get_function(f"affine_mma_{BITS}_bf16_t{tiles}")
    g = mod.get_function("sum_parts")
    args = (w, s, b, y, np.int32(n), xh, np.int32(k), np.int32(group), np.int32(m), np.int32(split))
    sargs = (y, out, np.int64(m * n), np.int32(parts))

    def run():
        f((-(-m // (16 * tiles)), -(-n // 128), parts), (128,), args)
        if parts > 1:
            g((min(-(-m * n // 256), 4096),), (256,), sargs)
        return out

    run.parts = parts
    return run


def gemv_launcher(w, s, b, xq, ds, m, n, k, group):
    y = cp.zeros((m, n), cp.float32)
    z = np.uint64(0)
    mm = 1 << (m - 1).bit_length()
    f = mod.get_function(f"q8_gemv_{BITS}_bf16_m{mm}")
    args = (
        w,
        s,
        b,
        y,
        np.int32(n),
        z,
        z,
        z,
        z,
        np.int32(0),
        z,
        z,
        z,
        z,
        np.int32(0),
        xq,
        ds,
        np.int32(k),
        np.int32(group),
        np.int32(m),
    )

    def run():
        f((-(-n // 8),), (128,), args)  # 8 rows a block (kernels.cu BG_ROWS)
        return y

    return run


def gemv(w, s, b, xq, ds, m, n, k, group):
    return gemv_launcher(w, s, b, xq, ds, m, n, k, group)()


#: cuBLAS's enums: CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F; weights.rs DEQUANT_SLICE_BYTES.
R_32F, R_16BF, COMPUTE_32F = 0, 14, 68
SLICE_BYTES = 256 << 20


def dequant_launcher(w, s, b, x, m, n, k, group, slice_bytes=SLICE_BYTES):
    """weights.rs `dequant_gemm`: the input cast to bf16, the weights dequantized to bf16 a
    slice of rows at a time, each slice's product by cuBLAS into its columns of y."""
    xh = cp.empty((m, k), cp.uint16)
    launch("cast_f32_bf16", (-(-m * k // 256),), (256,), (x, xh, np.int64(m * k)))
    rows_at = min(n, slice_bytes // (2 * k))
    wide = cp.empty((rows_at, k), cp.uint16)
    y = cp.empty((m, n), cp.float32)
    handle = cp.cuda.device.get_cublas_handle()
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)

    def run():
        cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
        for r0 in range(0, n, rows_at):
            rows = min(rows_at, n - r0)
            launch(
                f"int_dequant_{BITS}_bf16",
                (min(-(-rows * k // 32 // 256), 65535),),
                (256,),
                (w, s, b, wide, np.int32(r0), np.int32(rows), np.int32(k), np.int32(group)),
            )
            cublas.gemmEx(
                handle, 1, 0, rows, m, k, one.ctypes.data, wide.data.ptr, R_16BF, k,
                xh.data.ptr, R_16BF, k, zero.ctypes.data, y.data.ptr + 4 * r0, R_32F, n,
                COMPUTE_32F, -1,
            )  # fmt: skip
        return y

    return run


def float_reference(words, s16, b16, x, n, k, group):
    w = codes(words, k).astype(np.float64) * _f64(s16).repeat(group, 1) + _f64(b16).repeat(group, 1)
    return cp.asnumpy(x).astype(np.float64) @ w.T


def reference(words, s16, b16, xq, ds, m, n, k, group):
    q = codes(words, k).reshape(n, k // 32, 32).astype(np.float64)
    x = cp.asnumpy(xq[:m]).reshape(m, k // 32, 32).astype(np.float64)
    d = cp.asnumpy(ds[:m]).astype(np.float64)
    sc = _f64(s16).repeat(group // 32, 1)  # [n, chunks]
    bi = _f64(b16).repeat(group // 32, 1)
    dots = np.einsum("rci,mci->mrc", q, x)
    return np.einsum("mrc,rc,mc->mr", dots, sc, d[:, :, 0]) + np.einsum("rc,mc->mr", bi, d[:, :, 1])


def _f64(h):
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def bf16(a):
    """float64 values rounded to bf16 (to nearest even), as float64."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def bf16_reference(words, s16, b16, x, n, k, group):
    """The GEMM's product: weights bf16(scale·q + bias), inputs bf16, summed in float64."""
    w = bf16(codes(words, k) * _f64(s16).repeat(group, 1) + _f64(b16).repeat(group, 1))
    return bf16(cp.asnumpy(x).astype(np.float64)) @ w.T


def check():
    for n, k, group, m in [
        (192, 576, 64, 77),
        (200, 576, 32, 9),
        (1536, 576, 64, 100),
        (576, 1536, 128, 64),
        (96, 256, 64, 5),
        (301, 4096, 64, 40),
    ]:
        words, s, b = make(n, k, group)
        x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        dw, dsc, dbi = cp.asarray(words), cp.asarray(s), cp.asarray(b)
        if m > 8:
            want = bf16_reference(words, s, b, x, n, k, group)
            xh = cast_quads(x)
            for parts in (1, 3):
                got = cp.asnumpy(mma_launcher(dw, dsc, dbi, xh, m, n, k, group, parts)())
                err = np.abs(got - want).max() / np.abs(want).max()
                print(
                    f"mma  n={n} k={k} g={group} m={m} parts={parts}: max err {err:.2e}",
                    "OK" if err < 1e-5 else "BAD",
                )
        if m >= 64:
            # Slices of 100 rows, the last one short.
            got = cp.asnumpy(dequant_launcher(dw, dsc, dbi, x, m, n, k, group, 200 * k)())
            fwant = float_reference(words, s, b, x, n, k, group)
            err = np.abs(got - fwant).max() / np.abs(fwant).max()
            print(f"bf16 n={n} k={k} g={group} m={m}: max err {err:.2e}", "OK" if err < 1e-2 else "BAD")
        if m <= 8:
            xq, ds = quantize(x)
            want = reference(words, s, b, xq, ds, m, n, k, group)
            got = cp.asnumpy(gemv(dw, dsc, dbi, xq, ds, m, n, k, group))
            err = np.abs(got - want).max() / np.abs(want).max()
            print(f"gemv n={n} k={k} m={m}: max err {err:.2e}", "OK" if err < 1e-5 else "BAD")


def timeit(fs, reps=10):
    """µs per call of the functions `fs` taken in turn, replayed from a CUDA graph (no launch
    overhead); each works on its own copy of the weights, so that together they are past the
    L2 cache and every call reads its weights from memory, as a decode step does."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for f in fs:
            f()
        stream.begin_capture()
        for _ in range(reps):
            for f in fs:
                f()
        graph = stream.end_capture()
        graph.launch(stream)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / (reps * len(fs)) * 1e3


def timeit_eager(fs, reps=10):
    """As `timeit`, launched one by one (cuBLAS is not captured): µs per call."""
    for f in fs:
        f()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        for f in fs:
            f()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / (reps * len(fs)) * 1e3


#: Copies of each matrix the timings cycle through (8 of 28 MB are past an H200's 50 MB L2).
COPIES = 8


def bench():
    print(f"{SMS} SMs")
    for n, k in [(4096, 4096), (6144, 4096), (14336, 4096), (28672, 4096), (4096, 14336), (1024, 4096)]:
        copies = [tuple(cp.asarray(a) for a in make(n, k, 64)) for _ in range(COPIES)]
        wbytes = sum(a.nbytes for a in copies[0])
        for m in ROWS:
            if m == 1 and n == 1024:
                continue
            x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            line = f"n={n:>5} k={k:>5} m={m:>3}:"
            if m <= 8:
                xq, ds = quantize(x)
                us = timeit([gemv_launcher(*c, xq, ds, m, n, k, 64) for c in copies])
                line += f" gemv {us:7.1f} us {wbytes / us / 1e6:5.2f} TB/s |"
            else:
                xh = cast_quads(x)
                fs = [mma_launcher(*c, xh, m, n, k, 64) for c in copies]
                us = timeit(fs)
                tf = 2 * m * n * k / us / 1e6
                line += f" mma ({fs[0].parts}p) {us:7.1f} us {wbytes / us / 1e6:5.2f} TB/s {tf:6.1f} TFLOPS |"
            if m >= 64:
                us = timeit_eager([dequant_launcher(*c, x, m, n, k, 64) for c in copies])
                line += f" bf16 {us:7.1f} us {2 * m * n * k / us / 1e6:6.1f} TFLOPS |"
            print(line, flush=True)


if __name__ == "__main__":
    check()
    bench()
