"""``cortex.serve``: an OpenAI-compatible HTTP server on the continuous-batching engine.

The server itself is Rust (axum on tokio, in this process, beside the engine thread): a
request is parsed, tokenized, batched, sampled and streamed back without a Python hop per
token. Python starts it, names the model and waits for it to stop::

    server = cortex.serve("model.gguf", port=0, block=False)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    ...
    server.shutdown()
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Union

from . import _core
from .engine import Engine
from .generation import load

__all__ = ["Server", "serve"]

PathLike = Union[str, "os.PathLike[str]"]

#: Slice of a wait between signal checks.
_POLL_S = 0.1
#: After the shutdown deadline aborts what still runs, what connections get to close (as
#: the Rust side's CLOSE_GRACE), and a margin.
_CLOSE_GRACE_S = 5.0 + 1.0


class Server:
    """A running server, from ``cortex.serve(..., block=False)``. A context manager: leaving
    the ``with`` block shuts it down."""

    def __init__(self, core: _core.Server, model_name: str, shutdown_timeout: float) -> None:
        self._core: _core.Server | None = core
        self._shutdown_timeout = shutdown_timeout
        #: The name clients pass as ``model`` (``GET /v1/models`` lists it).
        self.model_name = model_name
        #: The address listened on.
        self.host = core.host
        self.port = core.port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root, ``http://host:port/v1``: what ``openai.OpenAI(base_url=...)``
        takes."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._core is not None and not self._core.wait(0.0)

    def stats(self) -> dict[str, float]:
        """The engine's statistics (as :meth:`cortex.Engine.stats`)."""
        return self._live().stats()

    def _live(self) -> _core.Server:
        if self._core is None:
            raise RuntimeError("the server has been shut down")
        return self._core

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (forever with ``None``) for the server to stop;
        True once it has. Signals (Ctrl-C) are handled between short waits."""
        if self._core is None:
            return True
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _POLL_S if until is None else min(_POLL_S, until - time.monotonic())
            if self._core.wait(max(left, 0.0)):
                return True
            if until is not None and time.monotonic() >= until:
                return False

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop gracefully: no new connections or requests, running ones finish (those
        still running after the server's ``shutdown_timeout`` are aborted), then the port
        is released. ``timeout`` caps the wait; past it the server stops at once."""
        if self._core is None:
            return
        self._core.shutdown()
        limit = self._shutdown_timeout + _CLOSE_GRACE_S if timeout is None else timeout
        self.wait(limit)
        self._core = None  # dropping it stops whatever is left and frees the port

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "running" if self._core is not None else "stopped"
        return f"Server({self.model_name!r} at {self.base_url}, {state})"


def _model_name(ref: PathLike | None, path: str) -> str:
    """A Hub repo id as given; otherwise the model file's stem or the folder's name."""
    if ref is not None and not isinstance(ref, Path):
        text = os.fspath(ref)
        if "/" in text and not os.path.exists(text):
            return text
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else p.name


def _template_source(chat_template: PathLike) -> str:
    """A template file's text, or the template itself when given inline."""
    text = os.fspath(chat_template)
    if os.path.isfile(text):
        return Path(text).read_text(encoding="utf-8")
    if "{{" in text or "{%" in text:
        return text
    raise FileNotFoundError(f"chat template file not found: {text}")


def serve(
    model: PathLike | _core.Model | None = None,
    tokenizer: _core.Tokenizer | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_batch_size: int | None = None,
    kv_cache_tokens: int | None = None,
    memory_fraction: float | None = None,
    prefix_caching: bool = True,
    sliding_window_eviction: bool = True,
    speculative: str | _core.Model | None = None,
    num_speculative_tokens: int | None = None,
    max_queue: int = _core.DEFAULT_MAX_QUEUE,
    chat_template: PathLike | None = None,
    shutdown_timeout: float = _core.DEFAULT_SHUTDOWN_TIMEOUT,
    write_timeout: float = _core.DEFAULT_WRITE_TIMEOUT,
    access_log: bool = True,
    insecure: bool = False,
    block: bool = True,
) -> Server | None:
    """Serve a model over OpenAI's HTTP API (``/v1/chat/completions``, ``/v1/completions``,
    ``/v1/models``, ``/health``, ``/metrics``).

    Args:
        model: a model reference as :func:`cortex.load` takes (``None``: the default
            model), or a loaded :class:`cortex.Model` (then ``tokenizer`` too).
        host, port: where to listen; port 0 picks a free one (see :attr:`Server.port`).
        api_key: when set (or ``CORTEX_API_KEY`` is), requests need
            ``Authorization: Bearer <key>``; ``/health`` and ``/metrics`` stay open.
            Listening on an address other than loopback needs a key, or ``insecure``.
        served_model_name: the name clients give as ``model`` (default: the Hub repo id,
            the file's stem or the folder's name).
        max_batch_size, kv_cache_tokens, memory_fraction, prefix_caching,
            sliding_window_eviction, speculative, num_speculative_tokens: the engine's (see
            :class:`cortex.Engine`).
        max_queue: sequences that may wait beyond the running batch; more get HTTP 429.
        chat_template: a Jinja chat template (a file, or its text) used instead of the
            model's.
        shutdown_timeout: seconds running requests get to finish once shutdown begins;
            then they are aborted.
        write_timeout: seconds a response may wait for a client that reads nothing; then
            the connection is closed and its request aborted (a stalled reader cannot hold
            a place in the batch).
        access_log: one line per request on stderr (method, path, status, tokens, time).
        insecure: serve on a non-loopback address without an API key (behind a gateway
            that authenticates, for instance).
        block: serve until Ctrl-C or SIGTERM (a graceful stop), then return ``None``;
            ``False`` returns the running :class:`Server` at once.

    Raises:
        RequestValidationError: a bad setting, the port cannot be bound, or a non-loopback
            address without an API key or ``insecure``.
        TemplateError: ``chat_template`` does not compile.
    """
    if isinstance(model, _core.Model):
        if tokenizer is None:
            raise TypeError("serve(model, tokenizer): a loaded model needs its tokenizer")
        loaded, tok, ref = model, tokenizer, None
    else:
        if tokenizer is not None:
            raise TypeError("serve: give a tokenizer only with a loaded model")
        loaded, tok = load(model)
        ref = model
    name = served_model_name or _model_name(ref, loaded.path)
    engine = Engine(
        loaded,
        tok,
        max_batch_size=max_batch_size,
        kv_cache_tokens=kv_cache_tokens,
        memory_fraction=memory_fraction,
        prefix_caching=prefix_caching,
        sliding_window_eviction=sliding_window_eviction,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
    )
    core = _core.Server(
        engine._core,
        served_model_name=name,
        host=host,
        port=port,
        api_key=api_key if api_key is not None else os.environ.get("CORTEX_API_KEY") or None,
        max_queue=max_queue,
        chat_template=None if chat_template is None else _template_source(chat_template),
        shutdown_timeout=shutdown_timeout,
        write_timeout=write_timeout,
        access_log=access_log,
        insecure=insecure,
    )
    server = Server(core, name, shutdown_timeout)
    if access_log:
        stats = engine.stats()
        kv_tokens = int(stats["kv_blocks_total"] * stats["kv_block_size"])
        print(
            f"Serving {name} at {server.base_url} (batch {engine.max_batch_size}, "
            f"KV cache {kv_tokens} tokens)",
            file=sys.stderr,
            flush=True,
        )
    if not block:
        return server
    _serve_until_stopped(server)
    return None


def _serve_until_stopped(server: Server) -> None:
    """Waits until Ctrl-C or SIGTERM, then stops gracefully; a second Ctrl-C stops at once."""
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            while not stop.is_set() and not server.wait(_POLL_S):
                pass
        except KeyboardInterrupt:
            pass
        print(
            f"Shutting down: running requests get {server._shutdown_timeout:g} s to finish",
            file=sys.stderr,
            flush=True,
        )
        try:
            server.shutdown()
        except KeyboardInterrupt:
            server.shutdown(timeout=0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
