"""Type stubs for the native module ``cortex._core`` (built from ``src/py/``)."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_NUM_BATCHED_TOKENS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_SPECULATIVE_TOKENS",
    "DEFAULT_WRITE_TIMEOUT",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "Completion",
    "Engine",
    "EngineStream",
    "Event",
    "Model",
    "Progress",
    "SamplingParams",
    "Server",
    "Tokenizer",
    "__version__",
    "_error_samples",
    "affine_quantize",
    "allow_amx",
    "amx_available",
    "amx_min_rows",
    "convert",
    "cuda_compiled",
    "cuda_device_count",
    "cuda_info",
    "engine_stats",
    "hub_cache_dir",
    "hub_snapshot_download",
    "kernel_isa",
    "load",
    "load_model",
    "load_tokenizer",
    "profile",
    "stream",
    "time_operation",
]

__version__: str
DEFAULT_MAX_BATCH_SIZE: int
DEFAULT_BLOCK_SIZE: int
DEFAULT_MAX_NUM_BATCHED_TOKENS: int
DEFAULT_SPECULATIVE_TOKENS: int

@final
class Model:
    """A loaded model: weights stay in their quantized form; safe to share across threads."""

    def forward(
        self, token_ids: Sequence[int], *, all_positions: bool = False
    ) -> npt.NDArray[np.float32]: ...
    def requantize(self, bits: int, *, head_bits: int | None = None, group_size: int = 32) -> Model: ...
    def dequantize(self) -> Model: ...
    def forward_batch(
        self, token_ids: Sequence[Sequence[int]], *, all_positions: bool = False
    ) -> list[npt.NDArray[np.float32]]: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def num_parameters(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def kv_bytes_per_token(self) -> int: ...
    @property
    def quantized(self) -> bool: ...
    @property
    def kv_dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def path(self) -> str: ...

@final
class Progress:
    def __new__(cls) -> Progress: ...
    def get(self) -> tuple[int, int]: ...
    def cancel(self) -> None: ...

@final
class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def has_chat_template(self) -> bool: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...

@final
class SamplingParams:
    def __new__(
        cls,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        max_new_tokens: int | None = None,
        temp: float | None = None,
        do_sample: bool | None = None,
        json_schema: dict[str, Any] | bool | str | None = None,
        json_object: bool = False,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> SamplingParams: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def stop(self) -> list[str]: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def json_schema(self) -> str | None: ...
    @property
    def json_object(self) -> bool: ...
    @property
    def regex(self) -> str | None: ...
    @property
    def grammar(self) -> str | None: ...

@final
class Event:
    """One event of a request: new text and the token that produced it, or its end."""

    @property
    def request_id(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def token(self) -> int | None: ...
    @property
    def logprobs(self) -> tuple[float, list[tuple[int, float]]] | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def generation_tokens(self) -> int: ...
    @property
    def prompt_tps(self) -> float: ...
    @property
    def generation_tps(self) -> float: ...
    @property
    def error(self) -> BaseException | None: ...

@final
class Completion:
    """What a finished request produced."""

    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def generation_tokens(self) -> int: ...
    @property
    def error(self) -> BaseException | None: ...

@final
class EngineStream(Iterator[Event]):
    def __iter__(self) -> EngineStream: ...
    def __next__(self) -> Event: ...
    def cancel(self) -> None: ...
    @property
    def request_ids(self) -> list[int]: ...

@final
class Engine:
    def __new__(
        cls,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int | None = None,
        kv_cache_tokens: int | None = None,
        memory_fraction: float | None = None,
        block_size: int = ...,
        max_num_batched_tokens: int = ...,
        kv_cache_size: int | None = None,
        rotating_kv_cache: bool = False,
        prefix_caching: bool = True,
        sliding_window_eviction: bool = True,
        speculative: str | Model | None = None,
        num_speculative_tokens: int | None = None,
    ) -> Engine: ...
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int: ...
    def wait(self, request_id: int) -> Completion: ...
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Completion]: ...
    def stream(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> EngineStream: ...
    def abort(self, request_id: int) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def save_prefix(self, prompt: Sequence[int], path: str) -> int: ...
    def load_prefix(self, path: str) -> int: ...
    @property
    def max_batch_size(self) -> int: ...

DEFAULT_MAX_QUEUE: int
DEFAULT_SHUTDOWN_TIMEOUT: float
DEFAULT_WRITE_TIMEOUT: float

@final
class Server:
    def __new__(
        cls,
        engine: Engine,
        *,
        served_model_name: str,
        host: str = ...,
        port: int = 8000,
        api_key: str | None = None,
        max_queue: int = ...,
        chat_template: str | None = None,
        shutdown_timeout: float = ...,
        write_timeout: float = ...,
        access_log: bool = True,
        insecure: bool = False,
    ) -> Server: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    def shutdown(self) -> None: ...
    def wait(self, timeout: float) -> bool: ...
    def stats(self) -> dict[str, float]: ...

def load(
    path: str | PathLike[str], progress: Progress | None = None, device: str = "cpu"
) -> tuple[Model, Tokenizer]: ...
def load_model(path: str | PathLike[str], progress: Progress | None = None, device: str = "cpu") -> Model: ...
def cuda_compiled() -> bool: ...
def cuda_device_count() -> int: ...
def cuda_info(ordinal: int) -> dict[str, Any]: ...
def profile(reset: bool = False, enable: bool | None = None) -> list[tuple[str, int, float]]: ...
def load_tokenizer(path: str | PathLike[str]) -> Tokenizer: ...
def stream(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    speculative: str | Model | None = None,
    num_speculative_tokens: int | None = None,
) -> EngineStream: ...
def engine_stats(
    model: Model, *, speculative: str | Model | None = None, num_speculative_tokens: int | None = None
) -> dict[str, float]: ...
def kernel_isa() -> str: ...
def amx_min_rows() -> int: ...
def amx_available() -> bool: ...
def allow_amx(allowed: bool) -> bool: ...
def time_operation(operation: str, shape: Sequence[int], iterations: int) -> tuple[float, float, float]: ...

SUPPORTED_BITS: tuple[int, ...]
SUPPORTED_GROUP_SIZES: tuple[int, ...]

def convert(
    source: str | PathLike[str],
    out: str | PathLike[str],
    *,
    quantization: str = "4bit",
    group_size: int = 64,
    critical_layers: Sequence[str] | None = None,
    critical_bits: int | None = None,
    standard_bits: int | None = None,
    predicate: Callable[[str, tuple[int, ...], dict[str, Any]], Any] | None = None,
    bits_override: int | None = None,
    output_format: str = "mlx",
    source_format: str = "huggingface",
    max_shard_bytes: int | None = None,
    validate: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]: ...
def affine_quantize(
    data: bytes, rows: int, cols: int, bits: int, group_size: int, dtype: str
) -> tuple[bytes, bytes, bytes]: ...
def hub_snapshot_download(
    repo_id: str,
    revision: str,
    filename: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Path: ...
def hub_cache_dir() -> Path: ...
def _error_samples() -> tuple[int, list[tuple[int, BaseException]]]: ...
