"""Cortex: convert language models to compact quantized formats and run them fast locally.

>>> import cortex
>>> model, tokenizer = cortex.load()          # the default model, SmolLM2-135M-Instruct
>>> for r in cortex.stream_generate(model, tokenizer, "Tell me about Rust", max_tokens=64):
...     print(r.text, end="", flush=True)
"""

from . import _native  # noqa: F401  (first: loads the Rust core, with CUDA's libraries in a GPU build)
from ._core import Model, SamplingParams, Tokenizer, __version__
from .accelerator import MLXAccelerator, MLXConfig
from .converter import ConversionConfig, ConversionFormat, MLXConverter, QuantizationRecipe
from .engine import Engine, RequestOutput, StreamEvent
from .exceptions import (
    CacheFullError,
    CancelledError,
    ConfigError,
    ContextLengthError,
    ConversionError,
    CortexError,
    CortexWarning,
    DeviceError,
    EngineError,
    GrammarError,
    InternalError,
    ModelFormatError,
    ModelLoadError,
    ModelNotFoundError,
    RequestValidationError,
    SavedPrefixError,
    TemplateError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from .generation import GenerationResponse, generate, load, load_model, load_tokenizer, stream_generate
from .hub import CacheError, EntryNotFoundError, HubError, LocalEntryNotFoundError
from .models import cortex_home, default_model_path
from .server import Server, serve

__all__ = [
    "CacheError",
    "CacheFullError",
    "CancelledError",
    "ConfigError",
    "ContextLengthError",
    "ConversionConfig",
    "ConversionError",
    "ConversionFormat",
    "CortexError",
    "CortexWarning",
    "DeviceError",
    "Engine",
    "EngineError",
    "EntryNotFoundError",
    "GenerationResponse",
    "GrammarError",
    "HubError",
    "InternalError",
    "LocalEntryNotFoundError",
    "MLXAccelerator",
    "MLXConfig",
    "MLXConverter",
    "Model",
    "ModelFormatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QuantizationRecipe",
    "RequestOutput",
    "RequestValidationError",
    "SamplingParams",
    "SavedPrefixError",
    "Server",
    "StreamEvent",
    "TemplateError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "__version__",
    "cortex_home",
    "default_model_path",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "serve",
    "stream_generate",
]
