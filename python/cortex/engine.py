"""The continuous-batching engine: many requests share one model, and every step runs all
of them through the model at once (weights are read once per step for the whole batch).

>>> engine = cortex.Engine(model, tokenizer, max_batch_size=16)
>>> outs = engine.generate_batch(["Hello", "Tell me about Rust"], max_tokens=32)
>>> [o.text for o in outs]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import _core
from ._core import Completion, Model, SamplingParams, Tokenizer
from .generation import Prompt, _encode_prompt, _params_or_keywords

__all__ = ["Engine", "RequestOutput", "StreamEvent"]


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced."""

    text: str
    token_ids: list[int]
    #: ``"stop"``, ``"length"``, ``"abort"`` or ``"error"``.
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    #: The exception of a failed request (``finish_reason == "error"``), else ``None``.
    error: BaseException | None = None

    @classmethod
    def _from_core(cls, c: Completion) -> RequestOutput:
        return cls(c.text, c.token_ids, c.finish_reason, c.prompt_tokens, c.generation_tokens, c.error)


@dataclass(frozen=True)
class StreamEvent:
    """One event of :meth:`Engine.stream`: new text of one request."""

    request_id: int
    #: Text completed by this event (may be empty).
    text: str
    #: ``None`` until the request's last event.
    finish_reason: str | None
    #: The sampled token (``None`` for an abort or an error).
    token: int | None = None
    error: BaseException | None = None


class Engine:
    """A continuous-batching engine over ``model``: a FIFO scheduler, a paged KV cache
    and per-request sampling, on a background thread.

    Args:
        model, tokenizer: from :func:`cortex.load`.
        max_batch_size: most requests running at once; the rest wait in order (default:
            ``CANDLE_NUM_PARALLEL`` when set, else ``_core.DEFAULT_MAX_BATCH_SIZE``, 32).
        kv_cache_tokens: positions the KV cache holds, shared by all requests...
        memory_fraction: ...or the fraction of available memory to give it (not both;
            by default the model's context, at most 32768 positions). The memory is
            reserved up front but only touched as it is used.
        block_size: positions per cache block.
        max_num_batched_tokens: tokens one step may run (prompt chunks and decode tokens).
        kv_cache_size: most positions one request may cache (default: the context).
        rotating_kv_cache: past ``kv_cache_size``, keep the first 4 positions and a sliding
            window of the most recent ones (mlx-lm's ``RotatingKVCache``) instead of
            stopping; needs ``kv_cache_size``.
        prefix_caching: share the cached keys and values of full blocks between requests
            whose tokens begin the same way (a system prompt, earlier chat turns), so that
            a repeated prefix is not computed again; output is the same either way. Off
            with ``rotating_kv_cache``. ``stats()`` reports ``prefix_cache_hits`` of
            ``prefix_cache_queries`` (prompt tokens) and ``prefix_cache_blocks``.
        sliding_window_eviction: a model's sliding-window layers (Gemma 3's five local
            layers of every six) keep only the positions their window still reads, in a
            pool of blocks of their own sized for the running requests' windows, instead
            of every position masked: their cache stops growing at the window (512
            positions for Gemma 3 270M, whose 32,000-token prompt then takes 115 MB of
            cache instead of 546 MB). ``kv_cache_tokens`` counts the other layers'
            positions. Output is the same either way. ``stats()`` reports
            ``kv_window_blocks_free`` of ``kv_window_blocks_total``.
        speculative: ``"prompt_lookup"`` (or vLLM's name, ``"ngram"``) for speculative
            decoding by prompt lookup: each step, a decoding request carries up to
            ``num_speculative_tokens`` draft tokens (those that followed the latest earlier
            occurrence of its last 2-4 tokens, in its prompt or output), which one forward
            pass verifies: each position's token is drawn as plain decoding draws it and
            a draft is kept while it matches, so greedy and seeded output are plain
            decoding's (where the verifying pass computes the same logits as single
            steps: on the CPU; on a GPU near-ties may part). It pays off where the
            output repeats its input (rewriting, extraction, code edits). ``stats()``
            reports ``speculative_draft_tokens`` and ``speculative_accepted_tokens``.
            Requests held to a grammar decode plainly.

            Or a draft model: a smaller :class:`Model` with the same tokenizer (a
            smaller model of the family, or a lower-bit conversion of this one), which
            proposes ``num_speculative_tokens`` tokens a step, one pass of it each, into a
            KV cache of its own that shares this engine's blocks (prefix caching and
            preemption included). A greedy request keeps a draft while it is the token
            plain decoding takes, so its output is plain decoding's; a sampled one keeps
            a draft ``x`` drawn from the draft model's distribution ``q`` with probability
            ``min(1, p(x) / q(x))`` and otherwise draws from ``max(0, p - q)`` (Leviathan
            et al. 2023), so its tokens follow the model's distribution ``p`` exactly and a
            seed still reproduces them (not plain decoding's draws, though: the draft's
            draw comes first). The draft model must have this model's vocabulary and be
            on the same device; the cache's memory covers both models.
        num_speculative_tokens: most draft tokens a request carries in one step (1-16;
            default 4); only with ``speculative``.

    Requests that do not fit the cache wait, or are preempted and recomputed later; a
    request that could never fit raises :class:`cortex.CacheFullError` at submission. The
    object is safe to share between threads.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        memory_fraction: float | None = None,
        block_size: int = _core.DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = _core.DEFAULT_MAX_NUM_BATCHED_TOKENS,
        kv_cache_size: int | None = None,
        rotating_kv_cache: bool = False,
        prefix_caching: bool = True,
        sliding_window_eviction: bool = True,
        speculative: str | Model | None = None,
        num_speculative_tokens: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._core = _core.Engine(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            kv_cache_tokens=kv_cache_tokens,
            memory_fraction=memory_fraction,
            block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_size=kv_cache_size,
            rotating_kv_cache=rotating_kv_cache,
            prefix_caching=prefix_caching,
            sliding_window_eviction=sliding_window_eviction,
            speculative=speculative,
            num_speculative_tokens=num_speculative_tokens,
        )

    def _params(
        self, params: SamplingParams | Sequence[SamplingParams] | None, sampling: dict[str, Any]
    ) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [_params_or_keywords(params, sampling)]
        if sampling:
            raise TypeError("pass either params or sampling keyword arguments, not both")
        return list(params)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, **sampling: Any) -> int:
        """Queue one request (text, chat messages or token ids); returns its id, for
        :meth:`result` and :meth:`abort`."""
        (p,) = self._params(params, sampling)
        return self._core.submit(_encode_prompt(self._tokenizer, prompt), p)

    def result(self, request_id: int) -> RequestOutput:
        """Wait for a request from :meth:`submit` to finish (GIL released; Ctrl-C aborts
        it). Each id can be collected once."""
        return RequestOutput._from_core(self._core.wait(request_id))

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **sampling: Any,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results in input order. ``params`` is one
        setting for all or one per prompt. The GIL is released for the whole batch; Ctrl-C
        aborts these requests (and only these)."""
        token_ids = [_encode_prompt(self._tokenizer, p) for p in prompts]
        completions = self._core.generate_batch(token_ids, self._params(params, sampling))
        return [RequestOutput._from_core(c) for c in completions]

    def stream(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **sampling: Any,
    ) -> Iterator[StreamEvent]:
        """Submit every prompt and yield their events as the engine produces them,
        interleaved across requests. Leaving the loop early aborts what is still running."""
        token_ids = [_encode_prompt(self._tokenizer, p) for p in prompts]
        stream = self._core.stream(token_ids, self._params(params, sampling))
        try:
            for e in stream:
                yield StreamEvent(e.request_id, e.text, e.finish_reason, e.token, e.error)
        finally:
            stream.cancel()

    def abort(self, request_id: int) -> None:
        """End a request now and free its cache blocks; unknown or finished ids are
        ignored."""
        self._core.abort(request_id)

    @property
    def max_batch_size(self) -> int:
        """Most requests running at once."""
        return self._core.max_batch_size

    def stats(self) -> dict[str, float]:
        """Throughput, latency percentiles (``ttft_p50_s``, ``itl_p99_s`` ...), queue and
        batch sizes, KV cache usage (``kv_blocks_free`` of ``kv_blocks_total``; for
        sliding-window layers, ``kv_window_blocks_free`` of ``kv_window_blocks_total``), the
        prefix cache (``prefix_cache_hits`` of ``prefix_cache_queries`` prompt tokens,
        ``prefix_cache_hit_rate``, ``prefix_cache_blocks``) and speculative decoding
        (``speculative_accepted_tokens`` of ``speculative_draft_tokens``,
        ``speculative_acceptance_rate``)."""
        return self._core.stats()

    def save_prefix(self, prefix: Prompt, path: str | os.PathLike[str]) -> int:
        """Save the KV cache of ``prefix`` (text, chat messages or token ids) to ``path``,
        so that a later engine (after a restart, say) can :meth:`load_prefix` it instead
        of computing it. Chat messages are rendered without a generation prompt, so a
        system prompt saved this way is the prefix of conversations that start with it
        (where the chat template renders it on its own, as most do).

        Only full cache blocks are saved (``block_size`` tokens each); returns the number
        of tokens saved. The prefix is computed first unless it is cached. The file is
        written whole or not at all.

        Raises:
            RequestValidationError: the engine has no prefix caching, or the prefix fills
                no block.
            SavedPrefixError: the file cannot be written.
        """
        return self._core.save_prefix(
            _encode_prompt(self._tokenizer, prefix, add_generation_prompt=False), os.fspath(path)
        )

    def load_prefix(self, path: str | os.PathLike[str]) -> int:
        """Put a prefix saved by :meth:`save_prefix` into the KV cache; requests that begin
        with it then find it there. Returns the number of tokens loaded. The blocks are
        cached like any others: evicted, least recently freed first, when space runs out.

        Raises:
            SavedPrefixError: the file is malformed or damaged (its length and a SHA-256
                of its contents are checked), or was saved from another model (its
                identity, and this model's own computation of its first block, are
                checked) or another cache layout (``block_size``, KV cache type), or
                holds more blocks than the whole cache.
        """
        return self._core.load_prefix(os.fspath(path))
