"""Environment variables that the tools Cortex's users come from read, honoured where they
mean something here and otherwise named in a one-time :class:`CortexWarning`, so that none
is silently ignored.

- ``CANDLE_NUM_PARALLEL`` (candle-based runners: how many prompts are generated at once):
  the default ``max_batch_size`` of every engine: :class:`cortex.Engine`'s, and the one a
  model starts for :func:`cortex.generate` and :func:`cortex.stream_generate`. It is read
  by the Rust core (``crate::engine::core::num_parallel``) when an engine starts; a value
  that is not a count of at least 1 raises :class:`cortex.ConfigError` then.
  :class:`cortex.MLXAccelerator`'s engines take ``MLXConfig.batch_size`` instead, as an
  explicit ``max_batch_size`` always wins.
- ``CANDLE_FORCE_F32`` (load float weights as f32 rather than f16): always the case on
  CPU, where float weights load as f32 and every activation is f32. A quantized model
  keeps its packed weights and an f16 KV cache, which the variable never covered; loading
  one while it is set says so once.
"""

from __future__ import annotations

import os
import threading
import warnings

from .exceptions import CortexWarning

__all__ = ["note_force_f32", "warn_once"]

_warned: set[str] = set()
_lock = threading.Lock()


def warn_once(key: str, message: str, stacklevel: int = 2) -> None:
    """Warn ``message`` the first time ``key`` comes up in this process (``stacklevel``
    counts from the caller of ``warn_once``)."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, CortexWarning, stacklevel=stacklevel + 1)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def note_force_f32(quantized: bool) -> None:
    """Called by the loaders: a quantized model under ``CANDLE_FORCE_F32`` is not made
    f32, and the first such load says so (the warning points at the loader's caller)."""
    if quantized and _truthy("CANDLE_FORCE_F32"):
        warn_once(
            "CANDLE_FORCE_F32",
            "CANDLE_FORCE_F32 is set: Cortex computes in float32 and loads float weights as float32 "
            "already, but this model is quantized and keeps its packed weights (and an f16 KV cache); "
            "use model.dequantize() for an all-float32 copy",
            stacklevel=3,
        )
