"""What structured output costs: decode speed and time to first token with a JSON schema
against the same requests unconstrained, on one engine.

    python benches/structured_speed.py [--model PATH] [--tokens 128] [--repeats 3]

Decode: ``batch`` requests (1 and 16) decode ``--tokens`` tokens greedily, ignoring
end-of-sequence, free or held to a schema that never completes early (an array of at
least 400 integers): one schema for all, or a different one per request (16 grammars).
A step's time is (wall time of ``tokens + 1`` tokens - wall time of 1 token) / ``tokens``,
the best of ``--repeats``, so prefill and the first token drop out.

Time to first token: one request at a time, submit to first streamed token, 20 times
each: free; with a schema seen before (compiled grammars are cached per tokenizer); with
a new schema every time (compiled at submission). The grammar compiler itself is built
once per tokenizer on first use, reported apart. ``mask_seconds`` is the time masks took
on the thread pool, overlapped with the forward passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import cortex

PROMPT = [{"role": "user", "content": "List numbers as a JSON array."}]


def endless(maximum: int = 999) -> dict[str, Any]:
    """A schema whose output cannot end within the benchmark's token budget."""
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": maximum}, "minItems": 400}


def step_ms(engine: cortex.Engine, batch: int, tokens: int, repeats: int, schemas: list[Any] | None) -> float:
    def wall(max_tokens: int) -> float:
        params = [
            cortex.SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
                json_schema=None if schemas is None else schemas[i % len(schemas)],
            )
            for i in range(batch)
        ]
        start = time.perf_counter()
        outs = engine.generate_batch([PROMPT] * batch, params)
        elapsed = time.perf_counter() - start
        assert all(o.error is None and o.generation_tokens == max_tokens for o in outs), outs[0]
        return elapsed

    best = min(wall(tokens + 1) - wall(1) for _ in range(repeats))
    return best / tokens * 1e3


def ttft_ms(engine: cortex.Engine, schema_for: Any, runs: int = 20) -> list[float]:
    out = []
    for i in range(runs):
        start = time.perf_counter()
        for _ in engine.stream([PROMPT], max_tokens=1, temperature=0.0, json_schema=schema_for(i)):
            break
        out.append((time.perf_counter() - start) * 1e3)
    return out


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20)
    return f"p50 {statistics.median(ms):7.1f} ms   p95 {q[18]:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = args.model or str(cortex.default_model_path())
    model, tok = cortex.load(path)
    engine = cortex.Engine(model, tok, max_batch_size=16)
    print(f"model: {path}")

    start = time.perf_counter()
    first = ttft_ms(engine, lambda i: endless(), runs=1)[0]
    print(f"first constrained request (builds the grammar compiler): {first:.1f} ms, "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms wall")

    print(f"\ndecode, {args.tokens} tokens, greedy, ignore_eos (ms a step; tok/s aggregate)")
    for batch in (1, 16):
        free = step_ms(engine, batch, args.tokens, args.repeats, None)
        rows = [("free", free)]
        rows.append(("one schema", step_ms(engine, batch, args.tokens, args.repeats, [endless()])))
        if batch > 1:
            distinct = [endless(900 + i) for i in range(batch)]
            rows.append((f"{batch} schemas", step_ms(engine, batch, args.tokens, args.repeats, distinct)))
        for name, ms in rows:
            print(f"  batch {batch:2d} {name:12s} {ms:7.2f} ms  {batch * 1e3 / ms:8.1f} tok/s  "
                  f"{ms / free:5.3f}x free")

    print("\ntime to first token, one request (submit to first token)")
    free = ttft_ms(engine, lambda i: None)
    hot = ttft_ms(engine, lambda i: endless())
    cold = ttft_ms(engine, lambda i: endless(10_000 + i))
    for name, ms in (("free", free), ("schema, cached", hot), ("schema, new", cold)):
        print(f"  {name:15s} {summary(ms)}   (+{statistics.median(ms) - statistics.median(free):.1f} ms p50)")
    stats = engine.stats()
    print(f"\nmask_seconds {stats['mask_seconds']:.3f} of busy_seconds {stats['busy_seconds']:.3f}")


if __name__ == "__main__":
    main()
