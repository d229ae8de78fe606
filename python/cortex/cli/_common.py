"""Options shared by several verbs."""

from __future__ import annotations

import argparse
import sys

from .._core import SamplingParams
from ..generation import GenerationResponse


def description(doc: str | None) -> str:
    """A module docstring as ``--help`` text (without reStructuredText's double backquotes)."""
    return (doc or "").replace("``", "")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a .gguf file or a directory holding one (default: SmolLM2-135M-Instruct)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="default: %(default)s")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def print_stats(last: GenerationResponse | None) -> None:
    if last is None:
        return
    print(
        f"\n[prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"peak memory: {last.peak_memory:.3f} GB]",
        file=sys.stderr,
    )
