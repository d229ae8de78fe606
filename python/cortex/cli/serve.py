"""``cortex serve``: serve a model over OpenAI's HTTP API.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus). Any OpenAI client works against http://HOST:PORT/v1. SIGTERM or
Ctrl-C stops gracefully: no new requests, running ones get --shutdown-timeout seconds to
finish, then the rest are aborted and the command exits 0.
"""

from __future__ import annotations

import argparse

from .._core import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_SPECULATIVE_TOKENS,
    DEFAULT_WRITE_TIMEOUT,
    Model,
)
from ..generation import load_model
from ..server import serve
from ._common import description


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = verbs.add_parser(
        name,
        help="serve a model over OpenAI's HTTP API",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="REF",
        default=None,
        help="a .gguf file, a model folder or a Hub repo id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CORTEX_API_KEY, else none)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key (e.g. behind an authenticating gateway)",
    )
    p.add_argument("--served-model-name", metavar="NAME", default=None, help="the model's name in the API")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-batch-size", type=int, default=None, help="most requests running at once")
    cache = engine.add_mutually_exclusive_group()
    cache.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in positions")
    cache.add_argument(
        "--memory-fraction", type=float, default=None, help="KV cache size as a fraction of free memory"
    )
    engine.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing cached prefixes",
    )
    engine.add_argument(
        "--no-sliding-window-eviction",
        dest="sliding_window_eviction",
        action="store_false",
        help="keep every position in sliding-window layers' cache (Gemma 3), not just their window",
    )
    drafts = engine.add_mutually_exclusive_group()
    drafts.add_argument(
        "--speculative",
        choices=["prompt_lookup", "ngram"],
        default=None,
        help="speculative decoding by prompt lookup (ngram: vLLM's name for it)",
    )
    drafts.add_argument(
        "--draft-model",
        metavar="MODEL",
        default=None,
        help="speculative decoding with drafts from this smaller model of the same tokenizer "
        "(a Hub repo id, a folder or a file)",
    )
    engine.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help=f"most draft tokens a request carries in one step (default: {DEFAULT_SPECULATIVE_TOKENS})",
    )
    engine.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="sequences that may wait beyond the batch; more get HTTP 429 (default: %(default)s)",
    )
    p.add_argument("--chat-template", metavar="FILE", default=None, help="a Jinja chat template to use")
    p.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help="time running requests get to finish on SIGTERM (default: %(default)s)",
    )
    p.add_argument(
        "--write-timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_WRITE_TIMEOUT,
        help="time a response waits for a client that reads nothing, then drops it (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no access log")


def run(args: argparse.Namespace) -> int:
    if args.num_speculative_tokens is not None and args.speculative is None and args.draft_model is None:
        raise ValueError("--num-speculative-tokens needs --speculative or --draft-model")
    speculative: str | Model | None = args.speculative
    if args.draft_model is not None:
        speculative = load_model(args.draft_model)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        kv_cache_tokens=args.kv_cache_tokens,
        memory_fraction=args.memory_fraction,
        prefix_caching=args.prefix_caching,
        sliding_window_eviction=args.sliding_window_eviction,
        speculative=speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        max_queue=args.max_queue,
        chat_template=args.chat_template,
        shutdown_timeout=args.shutdown_timeout,
        write_timeout=args.write_timeout,
        access_log=not args.quiet,
        insecure=args.insecure,
    )
    return 0
