"""Aggregate decode throughput of the engine at 1, 4, 16 and 64 concurrent requests, beside
llama.cpp on the same GGUF file with the same thread count.

    python benches/engine_throughput.py [--model PATH] [--gen-tokens 48]
        [--llama-python /opt/benchvenv/bin/python]

Every request gets its own ~32-token prompt and decodes greedily, ignoring end-of-sequence.
"Aggregate decode tok/s" counts the tokens produced after the last request received its
first token (so every request is decoding) over the time they took. llama.cpp
(``llama-cpp-python``) serves one sequence at a time, so its aggregate figure is its
single-stream decode speed whatever the concurrency; it runs in a child process with the
interpreter given by ``--llama-python`` (llama-cpp-python lives in a separate benchmark
venv, never in CI), or is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cpu_speed import bench_llama_cpp  # the llama.cpp child process both benchmarks run

import cortex

_TOPICS = [
    "the history of the printing press",
    "how rivers shape valleys over millions of years",
    "why the sky appears blue during the day",
    "the rules of chess for a complete beginner",
    "what makes sourdough bread rise",
    "how compilers turn source code into machine code",
    "the life cycle of a star like the Sun",
    "how vaccines train the immune system",
]


def _messages(n: int) -> list[list[dict[str, str]]]:
    """One chat prompt per request, each on its own topic (server_load.py sends the same)."""
    return [
        [
            {
                "role": "user",
                "content": f"Request {i}: write a short, clear explanation of "
                f"{_TOPICS[i % len(_TOPICS)]} for a curious reader.",
            }
        ]
        for i in range(n)
    ]


def _prompts(tok: cortex.Tokenizer, n: int) -> list[list[int]]:
    out = []
    for messages in _messages(n):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert isinstance(ids, list)
        out.append(ids)
    return out


def bench_cortex(model: cortex.Model, tok: cortex.Tokenizer, concurrency: int, n_gen: int) -> dict[str, float]:
    prompts = _prompts(tok, concurrency)
    need = sum(len(p) + n_gen for p in prompts)
    engine = cortex.Engine(model, tok, max_batch_size=concurrency, kv_cache_tokens=need + 16 * concurrency)
    started = time.perf_counter()
    stamps: list[tuple[float, int]] = []  # (time, request id) of every token
    first: dict[int, float] = {}
    for event in engine.stream(prompts, max_tokens=n_gen, ignore_eos=True):
        now = time.perf_counter()
        if event.token is not None:
            stamps.append((now, event.request_id))
            first.setdefault(event.request_id, now)
    end = time.perf_counter()
    all_decoding = max(first.values())
    after = sum(1 for t, _ in stamps if t > all_decoding)
    stats = engine.stats()
    return {
        "concurrency": concurrency,
        "decode_tps": after / max(end - all_decoding, 1e-9),
        "total_tps": len(stamps) / (end - started),
        "ttft_p50_s": stats["ttft_p50_s"],
        "itl_p50_s": stats["itl_p50_s"],
        "itl_p99_s": stats["itl_p99_s"],
        "preemptions": stats["preemptions"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file (default model if omitted)")
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python installed")
    args = p.parse_args()
    path = str(args.model or cortex.default_model_path())
    model, tok = cortex.load(path)
    threads = int(os.environ.get("CORTEX_NUM_THREADS") or os.cpu_count() or 1)
    print(f"model: {path}\nthreads: {threads}, tokens per request: {args.gen_tokens}\n")
    rows = [bench_cortex(model, tok, c, args.gen_tokens) for c in args.concurrency]
    base = rows[0]["decode_tps"] if rows[0]["concurrency"] == 1 else None
    llama = None
    if args.llama_python:
        ids = _prompts(tok, 1)[0]
        llama = bench_llama_cpp(args.llama_python, path, ids, args.gen_tokens, threads, repeats=1)
    header = f"{'requests':>8} {'decode tok/s':>13} {'vs batch-1':>10} {'vs llama.cpp':>12} "
    print(header + f"{'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'preempt':>7}")
    for r in rows:
        vs1 = f"{r['decode_tps'] / base:.2f}x" if base else "-"
        vsl = f"{r['decode_tps'] / llama['decode_tps']:.2f}x" if llama else "-"
        print(
            f"{int(r['concurrency']):>8} {r['decode_tps']:>13.1f} {vs1:>10} {vsl:>12} "
            f"{r['ttft_p50_s']:>8.2f}s {r['itl_p50_s'] * 1000:>6.0f}ms {r['itl_p99_s'] * 1000:>6.0f}ms "
            f"{int(r['preemptions']):>7}"
        )
    if llama:
        print(f"{'llama.cpp':>8} {llama['decode_tps']:>13.1f}   (one sequence at a time; same aggregate at any load)")
    else:
        print("llama.cpp: skipped (pass --llama-python with llama-cpp-python installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
