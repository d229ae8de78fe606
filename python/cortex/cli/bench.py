"""``cortex bench``: load time, prefill and decode speed, time to first token and peak
memory, beside llama.cpp (``llama-cpp-python``) on the same file when it is installed.

Both engines get the same prompt ids, the same thread count and greedy decoding that
ignores end-of-sequence, and are timed the same way: prefill as prompt tokens over time to
first token, decode as tokens after the first over the time they took. llama.cpp runs in a
child process so each peak-memory figure is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import resource
import sys
import time

from ..generation import load, stream_generate

_TEXT = (
    "Rust is a general-purpose programming language emphasizing performance, type safety and "
    "concurrency. It enforces memory safety without a garbage collector. "
)


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(name, help="measure speed (and compare with llama.cpp)", description=__doc__)
    p.add_argument("--model", metavar="PATH", default=None, help="a .gguf file (default model if omitted)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")


def _peak_rss_mb() -> float:
    # Linux: VmHWM belongs to this process's own memory; ru_maxrss would also count what a
    # spawned child inherited from its parent's high-water mark.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1024


def _figures(load_s: float, n_prompt: int, t_first: float, t_last: float, n_gen: int) -> dict[str, float]:
    return {
        "load_s": load_s,
        "ttft_s": t_first,
        "prefill_tps": n_prompt / t_first,
        "decode_tps": (n_gen - 1) / max(t_last - t_first, 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _bench_cortex(path: str | None, n_prompt: int, n_gen: int) -> tuple[dict[str, float], list[int], str]:
    t0 = time.perf_counter()
    model, tokenizer = load(path)
    load_s = time.perf_counter() - t0
    ids = tokenizer.encode(_TEXT * (1 + 2 * n_prompt // len(tokenizer.encode(_TEXT))))[:n_prompt]
    # Warm-up: first-touch page faults and thread-pool start-up are not the engine's speed.
    for _ in stream_generate(model, tokenizer, ids[:16], max_tokens=2, ignore_eos=True):
        pass
    start = time.perf_counter()
    t_first = t_last = 0.0
    for r in stream_generate(model, tokenizer, ids, max_tokens=n_gen, ignore_eos=True):
        t_last = time.perf_counter() - start
        if r.generation_tokens == 1:
            t_first = t_last
    return _figures(load_s, n_prompt, t_first, t_last, n_gen), ids, str(model.path)


def _bench_llama_cpp(path: str, ids: list[int], n_gen: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    load_s = time.perf_counter() - t0
    for i, _ in enumerate(llm.generate(ids[:16], top_k=1, temp=0.0, repeat_penalty=1.0)):
        if i == 1:
            break
    llm.reset()  # or generate() would reuse the warm-up's prompt tokens instead of evaluating them
    start = time.perf_counter()
    t_first = t_last = 0.0
    for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)):
        t_last = time.perf_counter() - start
        if i == 0:
            t_first = t_last
        if i + 1 == n_gen:
            break
    return _figures(load_s, len(ids), t_first, t_last, n_gen)


def _print_table(rows: dict[str, dict[str, float]]) -> None:
    metrics = [
        ("load_s", "load (s)", False),
        ("ttft_s", "time to first token (s)", False),
        ("prefill_tps", "prefill (tok/s)", True),
        ("decode_tps", "decode (tok/s)", True),
        ("peak_rss_mb", "peak RSS (MB)", False),
    ]
    names = list(rows)
    header = f"{'':26}" + "".join(f"{n:>14}" for n in names)
    if len(names) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for key, label, higher_better in metrics:
        line = f"{label:26}" + "".join(f"{rows[n][key]:>14.3f}" for n in names)
        if len(names) == 2:
            a, b = rows[names[0]][key], rows[names[1]][key]
            ratio = a / b if higher_better else b / a
            line += f"{ratio:>9.2f}x"
        print(line)
    if len(names) == 2:
        print("(ratio > 1 means cortex is better)")


def run(args: argparse.Namespace) -> int:
    threads = os.cpu_count() or 1
    ours, ids, path = _bench_cortex(args.model, args.prompt_tokens, args.gen_tokens)
    rows = {"cortex": ours}
    print(f"model: {path}\nprompt: {len(ids)} tokens, generation: {args.gen_tokens} tokens, "
          f"threads: {threads}")  # fmt: skip
    if not args.no_llama_cpp:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama_cpp is not importable: install llama-cpp-python to compare")
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                rows["llama.cpp"] = pool.apply(_bench_llama_cpp, (path, ids, args.gen_tokens, threads))
    _print_table(rows)
    return 0
