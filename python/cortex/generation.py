"""Loading models and generating text: ``load``, ``generate``, ``stream_generate``.

The shape follows mlx-lm (``stream_generate`` yields responses carrying the new text and
running statistics), so code written for it reads naturally here.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from . import _core, _env, hub
from ._core import Model, SamplingParams, Tokenizer
from ._progress import with_progress
from .models import default_model_path

__all__ = [
    "GenerationResponse",
    "Prompt",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "stream_generate",
]

#: A prompt: text, chat messages (rendered with the model's chat template) or token ids.
Prompt = Union[str, Sequence[Mapping[str, Any]], Sequence[int]]

PathLike = Union[str, "os.PathLike[str]"]


def _placement(device: str, dtype: str | None) -> str:
    """The device a load goes to: ``"auto"`` is ``$CORTEX_DEVICE`` when set, else the first
    GPU when this build has CUDA and the machine a GPU, else the CPU (a CUDA build without
    a GPU says so once)."""
    if dtype not in (None, "float32"):
        raise ValueError(f"dtype={dtype!r}: activations are 'float32' on every device")
    if device == "auto":
        device = os.environ.get("CORTEX_DEVICE", "").strip() or "auto"
    if device != "auto":
        return device
    if _core.cuda_device_count() > 0:
        return "cuda:0"
    if _core.cuda_compiled():
        message = "this build of Cortex has CUDA, but no GPU is visible: running on the CPU"
        _env.warn_once("no-gpu", message, stacklevel=3)
    return "cpu"


def _resolve(ref: PathLike | None, revision: str = "main") -> str:
    """The default model, a local path, or a Hub repo id fetched into the HF cache."""
    if ref is None:
        return str(default_model_path())
    return str(hub.resolve(os.fspath(ref), revision))


def load(
    ref: PathLike | None = None, *, device: str = "auto", dtype: str | None = None, revision: str = "main"
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer.

    Args:
        ref: a ``.gguf`` file, a model folder (Hugging Face or MLX layout, or one holding a
            ``.gguf``), or a Hub repo id (``org/name``, fetched into the Hugging Face cache;
            see :mod:`cortex.hub`). ``None`` loads the default model, SmolLM2-135M-Instruct.
        device: ``"auto"`` (``$CORTEX_DEVICE`` if set, else the first GPU when this build
            has CUDA and one is present, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: activation dtype; ``None`` or ``"float32"`` (on every device).
        revision: branch, tag or commit of a Hub repo id.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelNotFoundError: nothing loadable at ``ref``.
        ModelFormatError: the file is malformed or truncated.
        UnsupportedArchitectureError: the architecture is not supported.

    A progress bar shows a load that takes over half a second; Ctrl-C stops it at the next
    layer (``KeyboardInterrupt``).
    """
    placed = _placement(device, dtype)
    path = _resolve(ref, revision)
    model, tokenizer = with_progress("loading", "layer", lambda progress: _core.load(path, progress, placed))
    _env.note_force_f32(model.quantized)
    return model, tokenizer


def load_model(ref: PathLike | None = None, *, device: str = "auto", dtype: str | None = None) -> Model:
    """Load only a model's weights (see :func:`load`)."""
    placed = _placement(device, dtype)
    path = _resolve(ref)
    model = with_progress("loading", "layer", lambda progress: _core.load_model(path, progress, placed))
    _env.note_force_f32(model.quantized)
    return model


def load_tokenizer(ref: PathLike | None = None) -> Tokenizer:
    """Load only a model's tokenizer (see :func:`load`); no weights are read."""
    return _core.load_tokenizer(_resolve(ref))


@dataclass(frozen=True)
class GenerationResponse:
    """One step of a streamed generation."""

    #: Text completed by this step (concatenate all steps for the whole output).
    text: str
    #: The token sampled at this step.
    token: int
    #: ``(logprob, [(token, logprob), ...])`` when ``logprobs`` was requested.
    logprobs: tuple[float, list[tuple[int, float]]] | None
    #: ``None`` until the last step, then ``"stop"`` or ``"length"``.
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    #: Prompt tokens per second of prefill.
    prompt_tps: float
    #: Generated tokens per second since prefill ended.
    generation_tps: float
    #: Peak resident memory of this process so far, in GB.
    peak_memory: float


def _peak_memory_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _encode_prompt(tokenizer: Tokenizer, prompt: Prompt, *, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of ``prompt``: text encoded, chat messages through the chat template
    (ending in the assistant's turn, unless ``add_generation_prompt`` is false: a prefix of
    more conversation), token ids as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    items: list[Any] = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        ids = tokenizer.apply_chat_template(items, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert isinstance(ids, list)
        return ids
    if all(isinstance(t, int) for t in items):
        return [int(t) for t in items]
    raise TypeError("prompt must be a string, a list of chat messages or a list of token ids")


def _params_or_keywords(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    """``params``, or settings built from keyword arguments; not both."""
    if params is None:
        return SamplingParams(**sampling)
    if sampling:
        raise TypeError("pass either params or sampling keyword arguments, not both")
    return params


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams | None = None,
    *,
    speculative: str | Model | None = None,
    num_speculative_tokens: int | None = None,
    **sampling: Any,
) -> Iterator[GenerationResponse]:
    """Generate text, yielding a :class:`GenerationResponse` per token.

    Args:
        model, tokenizer: from :func:`load`.
        prompt: text, chat messages, or token ids.
        params: sampling settings; or pass their fields as keyword arguments
            (``max_tokens=64, temperature=0.7, ...``).
        speculative, num_speculative_tokens: speculative decoding, as
            :class:`cortex.Engine` takes them (``"prompt_lookup"``, or a draft
            :class:`Model`). Each setting runs on an engine of its own, shared by every
            caller with that setting.

    The prompt runs as one request on the model's own engine (a background thread shared
    by every caller of this model, so concurrent calls from several threads are batched
    together); the GIL is released while waiting. Ctrl-C raises ``KeyboardInterrupt``
    promptly and aborts the request, and the model stays usable. Leaving the loop early
    aborts it too.
    """
    params = _params_or_keywords(params, sampling)
    stream = _core.stream(
        model,
        tokenizer,
        _encode_prompt(tokenizer, prompt),
        params,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
    )
    try:
        for e in stream:
            if e.token is None:  # aborted (errors are raised, not yielded, for one request)
                return
            yield GenerationResponse(
                text=e.text,
                token=e.token,
                logprobs=e.logprobs,
                finish_reason=e.finish_reason,
                prompt_tokens=e.prompt_tokens,
                generation_tokens=e.generation_tokens,
                prompt_tps=e.prompt_tps,
                generation_tps=e.generation_tps,
                peak_memory=_peak_memory_gb(),
            )
    finally:
        stream.cancel()


def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams | None = None,
    *,
    speculative: str | Model | None = None,
    num_speculative_tokens: int | None = None,
    **sampling: Any,
) -> str:
    """Generate and return the whole text (see :func:`stream_generate`)."""
    responses = stream_generate(
        model,
        tokenizer,
        prompt,
        params,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
        **sampling,
    )
    return "".join(r.text for r in responses)
