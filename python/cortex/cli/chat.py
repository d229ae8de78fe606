"""``cortex chat``: an interactive conversation that keeps its history.

Type a message and press Enter. ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D)
quits; Ctrl-C stops a reply that is being written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..generation import load, stream_generate
from ._common import add_model_option, add_sampling_options, sampling_params


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(name, help="chat interactively", description=__doc__)
    add_model_option(p)
    add_sampling_options(p, max_tokens=512)
    p.add_argument("--system", default=None, help="a system prompt")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model)
    if not tokenizer.has_chat_template:
        print("cortex chat: this model has no chat template", file=sys.stderr)
        return 1
    base: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for r in stream_generate(model, tokenizer, messages, sampling_params(args)):
                reply.append(r.text)
                sys.stdout.write(r.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
