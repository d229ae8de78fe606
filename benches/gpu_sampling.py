"""What drawing tokens on the GPU (kernels.cu `sample_rows`) saves: decode tok/s of a model on
cuda:0, greedy, then sampled with the draw on the GPU and with it on the host (asking for
logprobs copies each row back and the host sampler draws: the same tokens, by definition), at
batch 1 and 32. Each run: B prompts of 128 tokens, 128 new tokens each, `generate_batch`
after a warm-up, best of two. With ``--cubin``, also `sample_rows` alone per setting (CuPy,
events over 50 launches, the logits' copy subtracted), its row in shared memory and in place.

    python benches/gpu_sampling.py MODEL_FOLDER
    nvcc -cubin -arch=sm_90a src/cuda/kernels.cu -o /tmp/k.cubin
    python benches/gpu_sampling.py MODEL_FOLDER --cubin /tmp/k.cubin
"""

from __future__ import annotations

import argparse
import struct
import time
from pathlib import Path

import cortex
from cortex import _core

#: (name, sampling settings): each drawn on the GPU, and on the host with ``logprobs=1``.
SETTINGS = [
    ("temperature 0.8", {"temperature": 0.8}),
    ("T 1, top-k 50, top-p 0.9, rep. 1.1",
     {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}),
]  # fmt: skip
PROMPT, NEW = 128, 128


def decode_tps(engine: _core.Engine, prompts: list[list[int]], settings: dict) -> float:
    n = len(prompts)
    params = [_core.SamplingParams(max_tokens=NEW, ignore_eos=True, seed=b, **settings) for b in range(n)]
    engine.generate_batch(prompts, params)  # warm-up: graphs, and the prompts in the prefix cache
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        out = engine.generate_batch(prompts, params)
        elapsed = time.perf_counter() - start
        assert all(len(c.token_ids) == NEW for c in out)
        best = max(best, len(prompts) * NEW / elapsed)
    return best


def end_to_end(folder: Path) -> None:
    model, tok = cortex.load(folder, device="cuda")
    vocab = int(model.config["vocab_size"])
    for batch in (1, 32):
        prompts = [[(i * 7 + 3 + 131 * b) % vocab for i in range(PROMPT)] for b in range(batch)]
        engine = _core.Engine(model, tok, max_batch_size=batch)
        print(f"B={batch:2d} {'greedy':36s} {decode_tps(engine, prompts, {}):9.1f} tok/s", flush=True)
        for name, settings in SETTINGS:
            gpu = decode_tps(engine, prompts, settings)
            host = decode_tps(engine, prompts, {**settings, "logprobs": 1})
            print(f"B={batch:2d} {name:36s} {gpu:9.1f} tok/s on the GPU, {host:9.1f} on the host", flush=True)


def kernel_alone(cubin: Path, vocab: int = 49152) -> None:
    import cupy as cp
    import numpy as np

    f = cp.RawModule(path=str(cubin)).get_function("sample_rows")
    f.max_dynamic_shared_size_bytes = vocab * 4
    rng = np.random.default_rng(0)

    def bits(x: float) -> int:
        return struct.unpack("<I", struct.pack("<f", x))[0]

    alone = {"greedy": (0.0, 0, 1.0), "T 1": (1.0, 0, 1.0), "T 1, top-k 50": (1.0, 50, 1.0),
             "T 1, top-p 0.9": (1.0, 0, 0.9), "T 1, top-k 50, top-p 0.9": (1.0, 50, 0.9),
             "T 1, top-k 1000": (1.0, 1000, 1.0)}  # fmt: skip
    for rows in (1, 32):
        base = cp.asarray((rng.standard_normal((rows, vocab)) * 3).astype(np.float32))
        x, out, penalized = cp.empty_like(base), cp.zeros(rows, dtype=cp.uint32), cp.zeros(2, dtype=cp.uint32)
        for name, (t, k, p) in alone.items():
            words = []
            for r in range(rows):
                draw = (12345 + 977 * r) * 0x9E3779B97F4A7C15 % (1 << 64)
                words += [bits(t), bits(p), bits(1.0), 0, 0, k, 0, 0, 0, 0, draw & 0xFFFFFFFF, draw >> 32]
            w = cp.asarray(np.array(words, dtype=np.uint32))
            for shared in (1, 0):
                args = (x, np.int32(vocab), w, penalized, np.int32(shared), out)
                launch = (f, (rows,), (1024,), args, vocab * 4 if shared else 0)
                drawn = _time_us(cp, x, base, launch) - _time_us(cp, x, base, None)
                where = "in shared memory" if shared else "in place"
                print(f"rows {rows:2d} {name:26s} {where:16s} {drawn:8.1f} us", flush=True)


def _time_us(cp, x, base, launch) -> float:
    """Mean µs of 50 copies of the logits into `x`, each followed by `launch` when given."""

    def once() -> None:
        cp.copyto(x, base)
        if launch:
            f, grid, block, args, shared = launch
            f(grid, block, args, shared_mem=shared)

    once()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(50):
        once()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 50 * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a model folder or file Cortex loads")
    p.add_argument("--cubin", type=Path, default=None, help="kernels.cu compiled for this GPU")
    args = p.parse_args()
    if args.cubin:
        kernel_alone(args.cubin)
    end_to_end(args.model)


if __name__ == "__main__":
    main()
