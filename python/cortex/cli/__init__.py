"""The ``cortex`` command line: one module per verb."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..exceptions import CortexError
from . import bench, chat, convert, generate, serve

__all__ = ["main"]

_VERBS = {"generate": generate, "chat": chat, "convert": convert, "serve": serve, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="cortex",
        description="Convert language models to quantized formats and run them on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for name, module in _VERBS.items():
        module.add_parser(verbs, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_VERBS[args.verb].run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (CortexError, ValueError, OSError) as err:
        print(f"cortex {args.verb}: error: {err}", file=sys.stderr)
        return 1
