"""CPU speed of Cortex beside llama.cpp, in one run: decode and prefill for the default
SmolLM2-135M-Instruct Q4_1 GGUF, its MLX 4-bit (group 64) and 8-bit conversions and Gemma 3
270M (Q4_K_M); the quantized matmul kernel alone in GB/s of weights read; and each model's
bytes per decoded token against the machine's measured memory bandwidth (the roofline).

    python benches/cpu_speed.py [--llama-python /opt/benchvenv/bin/python]
        [--prompt-tokens 512] [--gen-tokens 128] [--repeats 3] [--gemma PATH]
        [--gguf PATH ...] [--only-gguf] [--threads 1,2,8,16]

``--gguf`` adds any GGUF file (repeatable), ``--only-gguf`` measures those alone, and
``--threads`` runs the whole measurement once per thread count, each in a process of its own
(Cortex reads ``CORTEX_NUM_THREADS`` once), printing a table each and, at the end, one line
per model and thread count. Both engines get the same prompt ids, the same thread count
(``--threads``, else ``CORTEX_NUM_THREADS`` or the core count) and greedy decoding that
ignores end-of-sequence; each figure is the best
of ``--repeats`` runs (the machine's noise only ever slows a run down). Prefill is prompt
tokens over the time to the first token, decode is the tokens after the first over the time
they took. llama.cpp (``llama-cpp-python``, which lives in a separate benchmark venv, never
in CI) runs in a child process with the interpreter given by ``--llama-python``, on the
same GGUF file; for the MLX conversions, which llama.cpp cannot read, it runs the Q4_1 file
they were converted from. Without ``--llama-python`` its columns are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cortex
from cortex import ConversionConfig, MLXAccelerator, MLXConverter, QuantizationRecipe

_TEXT = (
    "The history of computing is a story of abstraction: each generation of engineers built "
    "tools that let the next one think about larger problems, from relays to transistors, "
    "from assembly to compilers, from single machines to networks spanning the planet. "
)

_LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
cfg = json.load(sys.stdin)
llm = Llama(model_path=cfg["path"], n_ctx=2048, n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"], n_batch=512, verbose=False)
for i, _ in enumerate(llm.generate(cfg["ids"][:16], top_k=1, temp=0.0, repeat_penalty=1.0)):
    if i == 1:
        break
best = {"prefill_tps": 0.0, "decode_tps": 0.0}
for _ in range(cfg["repeats"]):
    llm.reset()  # or generate() would reuse the cached prompt instead of evaluating it
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(cfg["ids"], top_k=1, temp=0.0, repeat_penalty=1.0):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == cfg["n_gen"]:
            break
    end = time.perf_counter()
    best["prefill_tps"] = max(best["prefill_tps"], len(cfg["ids"]) / (first - t0))
    best["decode_tps"] = max(best["decode_tps"], (n - 1) / (end - first))
print(json.dumps(best))
"""


def prompt_ids(tok: cortex.Tokenizer, n: int) -> list[int]:
    ids = tok.encode(_TEXT * (1 + 2 * n // len(tok.encode(_TEXT))))[:n]
    assert len(ids) == n
    return ids


def bench_cortex(
    model: cortex.Model, tok: cortex.Tokenizer, ids: list[int], n_gen: int, repeats: int
) -> dict[str, float]:
    for _ in cortex.stream_generate(model, tok, ids[:16], max_tokens=2, ignore_eos=True):
        pass  # warm-up: first-touch page faults and thread start-up
    best = {"prefill_tps": 0.0, "decode_tps": 0.0}
    for rep in range(repeats):
        # A new first token each time: no run finds the last one's blocks in the prefix cache
        # (as llama.cpp's side resets its cache).
        fresh = [(ids[0] + 1 + rep) % model.config["vocab_size"], *ids[1:]]
        start = time.perf_counter()
        first = last = 0.0
        for r in cortex.stream_generate(model, tok, fresh, max_tokens=n_gen, ignore_eos=True):
            last = time.perf_counter() - start
            if r.generation_tokens == 1:
                first = last
        best["prefill_tps"] = max(best["prefill_tps"], len(ids) / first)
        best["decode_tps"] = max(best["decode_tps"], (n_gen - 1) / (last - first))
    return best


def bench_llama_cpp(
    python: str, path: str, ids: list[int], n_gen: int, threads: int, repeats: int
) -> dict[str, float]:
    cfg = json.dumps({"path": path, "ids": ids, "n_gen": n_gen, "threads": threads, "repeats": repeats})
    out = subprocess.run([python, "-c", _LLAMA], input=cfg, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def kernel_table(acc: MLXAccelerator, config: dict) -> None:
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    print("\nThe quantized matmul alone (one token: [1, k] x [k, n]; prefill: 512 tokens)")
    print(f"{'shape (k, n)':>18} {'format':>11} {'time':>10} {'weights GB/s':>13} {'GFLOP/s':>9}")
    shapes = [((d, d), "q/o proj"), ((d, inter), "gate/up"), ((inter, d), "down"), ((d, vocab), "head")]
    for bits, group in [(4, 32), (4, 64), (8, 64)]:
        for (k, n), _ in shapes:
            r = acc.benchmark_operation(
                "qmatmul", (1, k, n, bits, group), num_iterations=200 if n < vocab else 20
            )
            fmt = f"{bits}-bit g{group}"
            print(
                f"{f'({k}, {n})':>18} {fmt:>11} {r['avg_time'] * 1e6:>8.1f}us "
                f"{r['gbytes_per_s']:>13.1f} {r['gflops']:>9.1f}"
            )
    r = acc.benchmark_operation("qmatmul", (512, d, inter, 4, 32), num_iterations=5)
    print(
        f"{f'prefill ({d}, {inter})':>18} {'4-bit g32':>11} {r['avg_time'] * 1e3:>8.2f}ms {'':>13} {r['gflops']:>9.1f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python installed")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--gemma", default=None, help="Gemma 3 270M GGUF (default: the test suite's copy, if fetched)"
    )
    p.add_argument("--gguf", action="append", default=[], help="another GGUF file to measure (repeatable)")
    p.add_argument("--only-gguf", action="store_true", help="measure the --gguf files alone")
    p.add_argument("--threads", default=None, help="thread counts, comma-separated: one run each")
    p.add_argument("--summary", default=None, help=argparse.SUPPRESS)  # a sweep's child writes here
    args = p.parse_args()
    if args.threads and "," in args.threads:
        return sweep(args)
    if args.threads:
        os.environ["CORTEX_NUM_THREADS"] = args.threads  # before Cortex's pool starts
    threads = int(os.environ.get("CORTEX_NUM_THREADS") or os.cpu_count() or 1)
    acc = MLXAccelerator()
    bandwidth = acc.benchmark_operation("bandwidth", (1024,), num_iterations=5)["gbytes_per_s"]
    q4_1 = str(cortex.default_model_path())
    gemma = Path(args.gemma) if args.gemma else cortex.cortex_home() / "models" / "gemma-3-270m-q4_k_m.gguf"
    print(f"threads: {threads}, prompt: {args.prompt_tokens} tokens, generation: {args.gen_tokens} tokens, "
          f"best of {args.repeats}; memory bandwidth: {bandwidth:.1f} GB/s")  # fmt: skip

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models: list[tuple[str, str, str]] = []
        if not args.only_gguf:
            models.append(("SmolLM2 Q4_1 GGUF", q4_1, q4_1))
            for recipe, label in [
                (QuantizationRecipe.SPEED_4BIT, "4-bit g64"),
                (QuantizationRecipe.QUALITY_8BIT, "8-bit g64"),
            ]:
                config = ConversionConfig(quantization=recipe, group_size=64, cache_converted=False)
                ok, message, out = MLXConverter(tmp).convert_model(q4_1, label.replace(" ", "-"), config)
                if not ok or out is None:
                    raise SystemExit(f"conversion to {label} failed: {message}")
                models.append((f"SmolLM2 MLX {label}", str(out), q4_1))
            if gemma.is_file():
                models.append(("Gemma 3 270M Q4_K_M", str(gemma), str(gemma)))
            else:
                print(f"Gemma 3 270M: skipped ({gemma} is missing; the test suite fetches it)")
        models += [(Path(g).name[:22], g, g) for g in args.gguf]
        config = {}
        for name, path, llama_path in models:
            model, tok = cortex.load(path)
            ids = prompt_ids(tok, args.prompt_tokens)
            ours = bench_cortex(model, tok, ids, args.gen_tokens, args.repeats)
            theirs = None
            if args.llama_python:
                theirs = bench_llama_cpp(
                    args.llama_python, llama_path, ids, args.gen_tokens, threads, args.repeats
                )
            context = args.prompt_tokens + args.gen_tokens // 2
            per_token = model.weight_bytes + context * model.kv_bytes_per_token
            rows.append((name, ours, theirs, per_token))
            if name.startswith("SmolLM2 Q4_1"):
                config = model.config

    print(f"\n{'model':<22} {'prefill':>9} {'llama.cpp':>10} {'ratio':>7} {'decode':>8} {'llama.cpp':>10} {'ratio':>7}"
          f" {'MB/token':>9} {'roofline':>9} {'of it':>6}")  # fmt: skip
    for name, ours, theirs, per_token in rows:
        roof = bandwidth * 1e9 / per_token
        lp, ld = _vs(ours, theirs, "prefill_tps"), _vs(ours, theirs, "decode_tps")
        print(
            f"{name:<22} {ours['prefill_tps']:>9.1f} {lp} {ours['decode_tps']:>8.1f} {ld} "
            f"{per_token / 1e6:>9.1f} {roof:>9.1f} {ours['decode_tps'] / roof:>5.0%}"
        )
    print("(tok/s; ratio > 1: Cortex is faster. MB/token: weights plus the KV cache (f16) read per decoded token at\n"
          " the mean context; roofline: the decode speed that memory bandwidth allows)")  # fmt: skip
    if args.summary:
        Path(args.summary).write_text(json.dumps([[name, ours, theirs] for name, ours, theirs, _ in rows]))
    elif config:
        kernel_table(acc, config)
    return 0


def _vs(ours: dict[str, float], theirs: dict[str, float] | None, key: str) -> str:
    """llama.cpp's figure and Cortex's ratio to it, or dashes without llama.cpp."""
    if not theirs:
        return f"{'-':>10} {'-':>7}"
    return f"{theirs[key]:>10.1f} {ours[key] / theirs[key]:>6.2f}x"


def sweep(args: argparse.Namespace) -> int:
    """The measurement once per thread count, each in a child process, then one line per
    model and thread count."""
    argv, skip = [], False
    for a in sys.argv[1:]:  # every argument but --threads (either spelling) and its value
        if not skip and not a.startswith("--threads"):
            argv.append(a)
        skip = a == "--threads"
    lines = []
    for t in [int(x) for x in args.threads.split(",") if x.strip()]:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            print(f"\n=== {t} thread(s) ===", flush=True)
            env = {**os.environ, "CORTEX_NUM_THREADS": str(t)}
            subprocess.run(
                [sys.executable, __file__, *argv, "--threads", str(t), "--summary", f.name],
                env=env,
                check=True,
            )
            for name, ours, theirs in json.loads(Path(f.name).read_text()):
                lines.append((t, name, ours, theirs))
    print(f"\n{'threads':>7} {'model':<22} {'prefill':>9} {'llama.cpp':>10} {'ratio':>7} {'decode':>8}"
          f" {'llama.cpp':>10} {'ratio':>7}")  # fmt: skip
    for t, name, ours, theirs in lines:
        rp, rd = _vs(ours, theirs, "prefill_tps"), _vs(ours, theirs, "decode_tps")
        print(f"{t:>7} {name:<22} {ours['prefill_tps']:>9.1f} {rp} {ours['decode_tps']:>8.1f} {rd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
