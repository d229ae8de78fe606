"""The exception tree of Cortex.

Every error Cortex raises on purpose is a :class:`CortexError`. Errors about bad input also
subclass the built-in class a Python user would catch for it (``ValueError`` for a malformed
file or an invalid parameter, ``FileNotFoundError`` for a missing model, ``RuntimeError``
for engine faults), so both ``except cortex.ModelFormatError`` and ``except ValueError``
work.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CacheFullError",
    "CancelledError",
    "ConfigError",
    "ContextLengthError",
    "ConversionError",
    "CortexError",
    "CortexWarning",
    "DeviceError",
    "EngineError",
    "GrammarError",
    "InternalError",
    "ModelFormatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "RequestValidationError",
    "SavedPrefixError",
    "TemplateError",
    "TokenizerError",
    "UnsupportedArchitectureError",
]


class CortexError(Exception):
    """Base class of every error Cortex raises on purpose.

    Keyword arguments become attributes (``path``, ``offset``, ``field``, ``param`` ...).
    """

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in attrs.items():
            setattr(self, key, value)


class ModelLoadError(CortexError):
    """A model could not be loaded. ``path`` names the file."""

    path: str | None = None


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The reference names no file, or a directory without model weights."""

    def __init__(self, message: str = "", **attrs: Any) -> None:
        CortexError.__init__(self, message, **attrs)


class ModelFormatError(ModelLoadError, ValueError):
    """A model file is malformed, truncated or hostile; ``offset`` is the byte position."""

    offset: int | None = None


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one Cortex runs; the message lists those it does."""

    architecture: str | None = None


class ConfigError(CortexError, ValueError):
    """A configuration field is missing, mistyped or out of range; ``field`` names it."""

    field: str | None = None


class TokenizerError(CortexError, ValueError):
    """The tokenizer could not be built or failed on its input."""


class TemplateError(CortexError, ValueError):
    """A chat template failed to parse or render (or ran out of its evaluation budget)."""


class RequestValidationError(CortexError, ValueError):
    """A request parameter is invalid; ``param`` names it."""

    param: str | None = None


class GrammarError(RequestValidationError):
    """A request's ``json_schema``, ``regex`` or ``grammar`` does not compile, or its output
    could not be continued validly; ``param`` names the parameter that carried it."""


class ContextLengthError(RequestValidationError):
    """The prompt does not fit in the model's context."""


class CacheFullError(ContextLengthError):
    """A request needs more KV cache positions than the engine's whole cache holds, so it
    could never run (raise ``kv_cache_tokens``). Requests that merely find the cache busy
    wait instead."""


class SavedPrefixError(CortexError, ValueError):
    """A saved prefix (:meth:`cortex.Engine.save_prefix`) could not be written, or a file
    given to :meth:`cortex.Engine.load_prefix` is malformed, or was saved from another
    model or KV cache layout (``path`` names it)."""


class EngineError(CortexError, RuntimeError):
    """A fault inside generation (a crashed worker, NaN logits ...)."""


class DeviceError(EngineError):
    """The GPU failed or ran out of memory (a smaller KV cache or model may avoid it)."""


class CancelledError(EngineError):
    """The work was cancelled."""


class InternalError(EngineError):
    """A broken invariant inside Cortex (a caught panic, a failed tensor operation on
    checked input): always a bug; please report it with the message."""


class ConversionError(CortexError):
    """A conversion could not be carried out (``MLXConverter.convert_model`` reports these
    as ``(False, message, None)`` rather than raising)."""


class CortexWarning(UserWarning):
    """Cortex did something other than what a call or setting literally asked for, and
    says what it did instead (an argument that does not match the model, an environment
    variable of another tool that has no counterpart here ...)."""
