"""``cortex chat``: an interactive conversation that keeps its history.

Type a message and press Enter. In a terminal the line can be edited and earlier lines
recalled with the arrow keys where Python has readline (kept between sessions in
$CORTEX_HOME/chat_history; without readline the banner does not offer recall).
``/reset`` forgets the conversation, ``/exit`` or Ctrl-D quits; Ctrl-C stops a reply that
is being written, or clears the line being typed (the conversation is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._core import Model
from ..generation import load, stream_generate
from ..models import cortex_home
from ._common import add_model_option, add_sampling_options, description, sampling_params

#: Lines of input history kept between sessions.
HISTORY_LENGTH = 1000


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(
        name,
        help="chat interactively",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p)
    add_sampling_options(p, max_tokens=512)
    p.add_argument("--system", default=None, help="a system prompt")


def _line_editing() -> ModuleType | None:
    """readline with the saved history loaded, where the platform has it (it is absent on
    Windows without a port); its import is what gives ``input()`` editing and recall."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(_history_file())
    except OSError:  # no history yet, or unreadable: start empty
        pass
    return readline


def _history_file() -> str:
    return str(cortex_home() / "chat_history")


def _save_history(readline: ModuleType) -> None:
    try:
        Path(_history_file()).parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(_history_file())
    except OSError as err:  # a read-only home must not turn a clean exit into an error
        print(f"cortex chat: history not saved: {err}", file=sys.stderr)


def banner(model: Model, recall: bool = True) -> str:
    """The first lines of an interactive session: which model, and the keys (the arrow
    keys' recall only with ``recall``, where readline is there to give it)."""
    path = Path(model.path)
    name = path.stem if path.is_file() else path.name
    params = model.num_parameters
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    keys = ["Enter sends", *(["↑/↓ recall"] if recall else []), "/reset forgets the conversation"]
    return (
        f"cortex chat · {name} ({size} parameters, {path})\n"
        f"{' · '.join(keys)} · /exit or Ctrl-D quits\n"
        "Ctrl-C stops a reply, or clears the line being typed\n"
    )


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args.model)
    if not tokenizer.has_chat_template:
        print("cortex chat: this model has no chat template", file=sys.stderr)
        return 1
    base: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    readline = _line_editing() if interactive else None
    if interactive:
        sys.stdout.write(banner(model, recall=readline is not None))
    try:
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                if interactive:
                    sys.stdout.write("\n")
                return 0
            except KeyboardInterrupt:
                if not interactive:
                    raise
                # The terminal echoed ^C; readline has dropped the line. Keep the conversation.
                sys.stdout.write("\n")
                continue
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
    finally:
        if readline is not None:
            _save_history(readline)
