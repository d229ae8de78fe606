"""``cortex generate``: stream a completion for one prompt to stdout.

The prompt is sent as a user message through the model's chat template when the model has
one (as ``mlx_lm.generate`` does); ``--raw`` sends it as plain text to be continued.
"""

from __future__ import annotations

import argparse
import sys

from ..generation import GenerationResponse, Prompt, load, stream_generate
from ._common import add_model_option, add_sampling_options, description, print_stats, sampling_params


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(
        name,
        help="generate text from a prompt",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p)
    add_sampling_options(p, max_tokens=256)
    template = p.add_mutually_exclusive_group()
    template.add_argument(
        "--raw",
        "--ignore-chat-template",
        dest="raw",
        action="store_true",
        help="send the prompt as plain text to continue, without the chat template",
    )
    template.add_argument(
        "--chat",
        action="store_true",
        help="require the chat template (an error if the model has none); the default uses it when present",
    )
    p.add_argument("--system", default=None, help="a system prompt (through the chat template)")
    p.add_argument("--quiet", action="store_true", help="do not print statistics")
    p.add_argument("prompt", metavar="PROMPT")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model)
    use_template = not args.raw and tokenizer.has_chat_template
    if (args.chat or args.system) and not use_template:
        why = "--raw was given" if args.raw else "this model has no chat template"
        print(f"cortex generate: --{'chat' if args.chat else 'system'} needs the chat template, but {why}",
              file=sys.stderr)  # fmt: skip
        return 1
    prompt: Prompt = args.prompt
    if use_template:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = [*system, {"role": "user", "content": args.prompt}]
    last: GenerationResponse | None = None
    for last in stream_generate(model, tokenizer, prompt, sampling_params(args)):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:
        print_stats(last)
    return 0
