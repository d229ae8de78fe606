"""``cortex generate``: stream a completion for one prompt to stdout."""

from __future__ import annotations

import argparse
import sys

from ..generation import GenerationResponse, load, stream_generate
from ._common import add_model_option, add_sampling_options, print_stats, sampling_params


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(name, help="generate text from a prompt", description=__doc__)
    add_model_option(p)
    add_sampling_options(p, max_tokens=256)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--quiet", action="store_true", help="do not print statistics")
    p.add_argument("prompt", metavar="PROMPT")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    last: GenerationResponse | None = None
    for last in stream_generate(model, tokenizer, prompt, sampling_params(args)):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:
        print_stats(last)
    return 0
