"""What speculative decoding gains on an input-grounded task: decode speed with
``speculative="prompt_lookup"`` (or a draft model) against plain decoding, on one model, at
batch 1 and 16.

    python benches/speculative.py [--model PATH] [--tokens 256] [--draft 4] [--repeats 2]
    python benches/speculative.py --draft-model 4 --target 8 [--temperature 0.7]

With ``--draft-model BITS`` the model requantized to BITS drafts for the model requantized
to ``--target`` bits (a stand-in for a small and a large model of one family).

The task: a text of about 1,000 tokens, given in the prompt, is to be rewritten (each
request gets its own text, so nothing is shared between requests). Each request generates
``--tokens`` tokens greedily, ignoring end-of-sequence. Decode speed is aggregate: the
tokens after the first over the wall time they took (a run of one token is subtracted, so
prefill drops out), the best of ``--repeats``. The prompts are cached (prefix caching,
on by default) by a first run, so that every timed run finds them alike.
"""

from __future__ import annotations

import argparse
import time

import cortex

SUBJECTS = ["harbour", "orchard", "railway", "library", "market", "mill", "bridge", "school"]


def text(i: int, words: int = 700) -> str:
    """An article of about ``words`` words (some 1,000 tokens), different for each ``i``."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    sentences = []
    n = 0
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(
            f"In year {1900 + 7 * n + i} the {subject} of the town of Ashford saw {n + 3} new "
            f"workers arrive, and the council recorded that the {subject} had served "
            f"{120 + 13 * n} families that season, more than in any season before it."
        )
        n += 1
    return " ".join(sentences)


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Rewrite this text, keeping every fact:\n\n{text(i)}"}]


def run(engine: cortex.Engine, batch: int, tokens: int, repeats: int, temperature: float = 0.0) -> float:
    """Aggregate decode tok/s: (wall time of ``tokens`` tokens - wall time of 1) over the
    ``tokens - 1`` tokens between, so that prefill and the first token drop out."""
    prompts = [prompt(i) for i in range(batch)]

    def wall(max_tokens: int) -> float:
        params = [
            cortex.SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens, ignore_eos=True)
            for i in range(batch)
        ]
        start = time.perf_counter()
        outs = engine.generate_batch(prompts, params)
        assert all(o.error is None and o.generation_tokens == max_tokens for o in outs)
        return time.perf_counter() - start

    wall(1)  # caches the prompts: from here on, every run finds them in the prefix cache
    best = min(wall(tokens) - wall(1) for _ in range(repeats))
    return batch * (tokens - 1) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--draft", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--draft-model",
        metavar="BITS",
        default=None,
        help="draft with the model requantized to BITS (groups of 32) instead of prompt lookup",
    )
    ap.add_argument(
        "--target",
        metavar="BITS",
        default="8",
        help="with --draft-model: the model requantized to BITS (or 'f32': dequantized) is the target",
    )
    ap.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (seeded)")
    args = ap.parse_args()
    path = args.model or str(cortex.default_model_path())
    model, tok = cortex.load(path)
    speculative: str | cortex.Model = "prompt_lookup"
    name = "prompt lookup"
    if args.draft_model is not None:
        speculative = model.requantize(int(args.draft_model), group_size=32)
        model = (
            model.dequantize() if args.target == "f32" else model.requantize(int(args.target), group_size=32)
        )
        name = f"{args.draft_model}-bit draft"
        print(f"target: the model at {args.target} bits; draft: at {args.draft_model} bits")
    n = len(tok.apply_chat_template(prompt(0), add_generation_prompt=True, tokenize=True))
    print(
        f"model: {path}\nprompt: {n} tokens; {args.tokens} generated a request, "
        f"temperature {args.temperature}\n"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        # A cache that holds every request whole (the default, the model's 8,192-token
        # context, holds 7 of these): all `batch` run together, none waits or is preempted.
        size = {"max_batch_size": batch, "kv_cache_tokens": batch * (n + args.tokens + 64)}
        plain = cortex.Engine(model, tok, **size)
        spec = cortex.Engine(model, tok, **size, speculative=speculative, num_speculative_tokens=args.draft)
        base = run(plain, batch, args.tokens, args.repeats, args.temperature)
        fast = run(spec, batch, args.tokens, args.repeats, args.temperature)
        s = spec.stats()
        print(
            f"batch {batch:2d}: plain {base:7.1f} tok/s   {name} {fast:7.1f} tok/s   "
            f"{fast / base:5.2f}x   acceptance {s['speculative_acceptance_rate']:.2f} "
            f"({s['speculative_accepted_tokens']:.0f} of {s['speculative_draft_tokens']:.0f} drafts)"
        )


if __name__ == "__main__":
    main()
