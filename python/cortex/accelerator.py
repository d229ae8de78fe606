"""``MLXAccelerator`` and ``MLXConfig``: the original project's notebook API on Cortex's engine.

Every setting either changes what the engine does or is reported by
:meth:`MLXAccelerator.get_device_info` as not applicable on this backend (with the reason);
none is silently ignored.

>>> acc = cortex.MLXAccelerator()
>>> for chunk in acc.generate_optimized(model, tokenizer, "Tell me about Rust", max_tokens=64):
...     print(chunk, end="", flush=True)

The original's guide (docs/mlx-acceleration.md of the MLX project) runs as written:
examples/mlx_guide.py follows it call by call.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
import platform
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union, overload

import numpy as np

from . import _core
from ._core import Model, SamplingParams, Tokenizer
from .engine import Engine
from .exceptions import CortexError, CortexWarning, TokenizerError
from .generation import Prompt, _placement, load_tokenizer

__all__ = ["OPTIMIZATION_PRESETS", "MLXAccelerator", "MLXConfig", "Pipeline"]

_DTYPES = ("float32", "float16", "bfloat16")
#: What activations compute in (CPU and GPU), whatever ``MLXConfig.dtype`` asks for.
_ACTIVATION_DTYPE = "float32"
_BITS = (2, 3, 4, 5, 6, 8)

#: A pipeline stage: a model (its tokenizer is found beside it) or a (model, tokenizer) pair.
Stage = Union[Model, "tuple[Model, Tokenizer]"]


def _dtype_name(dtype: object) -> str:
    """The name of a dtype given as text (``"bfloat16"``) or as a dtype object: mlx's
    (``mx.bfloat16``, printed ``mlx.core.bfloat16``) or numpy's (``np.float16``)."""
    if isinstance(dtype, str) or dtype is None:
        return str(dtype)
    try:
        return str(np.dtype(dtype).name)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(dtype).rsplit(".", 1)[-1]


class _DtypeName:
    """``MLXConfig.dtype``: set from a name (``"bfloat16"``) or an mlx/numpy dtype object
    (``mx.bfloat16``), validated, and read back as the name, a ``str``."""

    default = "bfloat16"

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_{name}"

    def __get__(self, obj: object | None, owner: type | None = None) -> str:
        if obj is None:  # the dataclass's default
            return self.default
        value: str = getattr(obj, self._attr)
        return value

    def __set__(self, obj: object, value: object) -> None:
        name = _dtype_name(value)
        if name not in _DTYPES:
            raise ValueError(
                f"dtype={value!r}: one of {', '.join(_DTYPES)}, by name or as an mlx/numpy dtype"
            )
        setattr(obj, self._attr, name)


@dataclass
class MLXConfig:
    """Accelerator settings (the original fields and defaults)."""

    compile_model: bool = True
    use_graph: bool = True
    #: Most requests the engine runs in one step.
    batch_size: int = 8
    prefetch_size: int = 2
    stream_parallel: bool = True
    fusion_threshold: int = 1024
    #: Share of available memory the KV cache may take.
    memory_fraction: float = 0.85
    #: ``"bfloat16"``, ``"float16"`` or ``"float32"``; an mlx or numpy dtype object
    #: (``mx.bfloat16``) is accepted too, here or assigned later, and stored as its name
    #: (reading it always gives a ``str``).
    dtype: _DtypeName = _DtypeName()
    #: Let quantized products of 9 or more activation rows (prefill, batched decode) run
    #: on Intel AMX where the CPU and OS grant it (``get_device_info()["amx_available"]``).
    #: Process-wide: the kernels are shared, so the accelerator made last decides.
    use_amx: bool = True
    fuse_operations: bool = True
    lazy_evaluation: bool = True
    #: Past ``kv_cache_size`` positions, keep the first ones and a sliding window.
    rotating_kv_cache: bool = True
    kv_cache_size: int = 4096
    quantization_bits: int = 4
    mixed_precision: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction}: must be in (0, 1]")
        if self.kv_cache_size < 8:
            raise ValueError(f"kv_cache_size={self.kv_cache_size}: must be at least 8")
        if self.quantization_bits not in _BITS:
            raise ValueError(f"quantization_bits={self.quantization_bits}: one of {_BITS}")
        if self.prefetch_size < 0 or self.fusion_threshold < 0:
            raise ValueError("prefetch_size and fusion_threshold must not be negative")


@contextmanager
def amx_allowed(allowed: bool) -> Iterator[None]:
    """AMX allowed (or not) for this process's products while the block runs, the previous
    setting restored after it (``use_amx`` of one call)."""
    before = _core.allow_amx(allowed)
    try:
        yield
    finally:
        _core.allow_amx(before)


#: Named starting points: field overrides of :class:`MLXConfig`.
OPTIMIZATION_PRESETS: dict[str, dict[str, Any]] = {
    "speed": {"batch_size": 16, "quantization_bits": 4, "kv_cache_size": 4096, "rotating_kv_cache": True},
    "memory": {
        "batch_size": 4,
        "quantization_bits": 4,
        "kv_cache_size": 2048,
        "rotating_kv_cache": True,
        "memory_fraction": 0.5,
    },
    "balanced": {"batch_size": 8, "quantization_bits": 8, "mixed_precision": True, "kv_cache_size": 4096},
}

#: Settings this CPU backend has no counterpart for, and why.
_NOT_APPLICABLE = {
    "compile_model": "no graph compiler: the decoder runs eagerly in Rust",
    "use_graph": "no graph capture on CPU",
    "prefetch_size": "weights stay resident in memory; nothing to prefetch",
    "stream_parallel": "one compute pool; requests are batched instead of run on parallel streams",
    "fusion_threshold": "no operator fusion pass",
    "fuse_operations": "no operator fusion pass",
    "lazy_evaluation": "evaluation is eager",
}


def _takes_argument(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a positional argument (builtins without a signature, such as
    numpy's functions, are taken to)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in kinds or p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


#: Calls of a benchmarked callable before the timed loop, as the original made: the first
#: ones pay for compilation, allocation and thread start-up.
_WARMUP_CALLS = 10


def _code_names(code: types.CodeType) -> set[str]:
    """The global and free names ``code`` and the code nested in it (comprehensions,
    inner lambdas) refer to."""
    names = set(code.co_names) | set(code.co_freevars)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _framework(fn: Callable[..., Any]) -> str | None:
    """The array framework ``fn`` computes with, where something says: ``"torch"``,
    ``"mlx"`` or ``"numpy"``, from the package ``fn`` itself (or its type: a
    ``torch.nn.Module``, a numpy ufunc) comes from, or from the modules and objects its code
    refers to (``torch.matmul`` in a lambda); ``None`` when nothing does (``lambda x: x @
    x.T``)."""
    found: set[str] = set()

    def note(obj: object) -> None:
        if isinstance(obj, types.ModuleType):
            found.add(obj.__name__.partition(".")[0])
            return
        for module in (getattr(obj, "__module__", None), type(obj).__module__):
            if isinstance(module, str):
                found.add(module.partition(".")[0])

    note(fn)
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        scope: dict[str, Any] = dict(getattr(fn, "__globals__", {}))
        for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
            try:
                scope[name] = cell.cell_contents
            except ValueError:  # a cell not filled yet
                pass
        for name in _code_names(code):
            if name in scope:
                note(scope[name])
    return next((f for f in ("torch", "mlx", "numpy") if f in found), None)


def _array_call(
    operation: Callable[..., Any], shape: tuple[int, ...]
) -> tuple[str, Callable[[], Any], Callable[[], None]]:
    """``operation`` bound to one standard-normal float32 input of ``shape``, built once
    in the framework it computes with: a torch tensor (``torch.from_numpy``) for a torch
    function; an mlx array (``mx.random.normal``, evaluated) for an mlx one, or for one
    that names no framework while mlx is imported (the original's case); a numpy array
    otherwise. Returns the framework's name, the call (which forces the result: ``mx.eval``
    for mlx, ``numpy.asarray`` for numpy, so lazy work is timed) and what finishes
    outstanding device work after the loop (torch's CUDA queue)."""
    framework = _framework(operation)
    torch = sys.modules.get("torch")
    mx = sys.modules.get("mlx.core")
    if framework == "torch" and torch is not None:
        x_torch = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        cuda = getattr(torch, "cuda", None)

        def sync() -> None:
            if cuda is not None and cuda.is_available() and cuda.is_initialized():
                cuda.synchronize()

        return "torch", lambda: operation(x_torch), sync
    if mx is not None and framework in ("mlx", None):
        x_mlx = mx.random.normal(shape)
        mx.eval(x_mlx)
        return "mlx", lambda: mx.eval(operation(x_mlx)), lambda: None
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return "numpy", lambda: np.asarray(operation(x)), lambda: None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cpu() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (Linux ``/proc/cpuinfo``; the platform's
    processor name and no flags elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, set(fields.get("flags", "").split())


class Pipeline:
    """Models chained by :meth:`MLXAccelerator.create_pipeline`; call it with prompts."""

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines

    @overload
    def __call__(self, prompts: str, **sampling: Any) -> str: ...
    @overload
    def __call__(self, prompts: Sequence[Prompt], **sampling: Any) -> list[str]: ...
    def __call__(self, prompts: str | Sequence[Prompt], **sampling: Any) -> str | list[str]:
        """Run ``prompts`` through every stage; returns the last stage's texts, in order
        (one prompt given as a string: one text). ``sampling``: :class:`cortex.SamplingParams`
        fields, for every stage. A stage that answers a prompt with nothing (the model ended
        at once) ends that prompt's chain: the empty text is its result, since the next
        stage has nothing to continue."""
        if isinstance(prompts, str):
            return self([prompts], **sampling)[0]
        texts: list[Prompt] = list(prompts)
        live = list(range(len(texts)))
        for engine in self.engines:
            outs = engine.generate_batch([texts[i] for i in live], **sampling)
            for out in outs:
                if out.error is not None:
                    raise out.error
            for i, out in zip(live, outs, strict=True):
                texts[i] = out.text
            live = [i for i in live if texts[i]]
        return [str(t) for t in texts]


class MLXAccelerator:
    """Runs models on Cortex's engine with the settings of an :class:`MLXConfig`."""

    OPTIMIZATION_PRESETS = OPTIMIZATION_PRESETS

    def __init__(self, config: MLXConfig | None = None) -> None:
        self.config = config or MLXConfig()
        _core.allow_amx(self.config.use_amx)
        #: Where ``cortex.load(..., device="auto")`` puts models: the first GPU of a CUDA
        #: build on a machine with one, else the CPU. Models run where they were loaded.
        self.device = _placement("auto", None)
        #: Activations are float32 whatever ``config.dtype`` asks for.
        self.dtype = _ACTIVATION_DTYPE
        self._engines: dict[int, tuple[Model, Tokenizer, Engine]] = {}
        self._lock = threading.Lock()
        #: What the last :meth:`optimize_memory` did (``None`` before the first call).
        self.last_memory_report: dict[str, Any] | None = None
        #: Seconds of the last :meth:`optimize_model` warm-up pass (``None`` before one).
        self.last_warmup_seconds: float | None = None

    @classmethod
    def from_preset(cls, name: str) -> MLXAccelerator:
        """An accelerator configured by one of :data:`OPTIMIZATION_PRESETS`."""
        if name not in OPTIMIZATION_PRESETS:
            raise ValueError(f"unknown preset {name!r}; one of {', '.join(OPTIMIZATION_PRESETS)}")
        return cls(MLXConfig(**OPTIMIZATION_PRESETS[name]))

    # ── Engine ────────────────────────────────────────────────────────────────────────────

    def _kv_cache_tokens(self, model: Model, batch_size: int | None = None) -> int:
        """The engine's cache: room for ``batch_size`` sequences of ``kv_cache_size``
        positions, within ``memory_fraction`` of the memory available now."""
        c = self.config
        want = (batch_size or c.batch_size) * c.kv_cache_size
        available = _meminfo().get("MemAvailable")
        if available:
            want = min(want, int(available * c.memory_fraction) // model.kv_bytes_per_token)
        return max(want, 16)

    def engine(self, model: Model, tokenizer: Tokenizer) -> Engine:
        """The engine this accelerator runs ``model`` on (created on first use)."""
        with self._lock:
            entry = self._engines.get(id(model))
            if entry is None or entry[0] is not model or entry[1] is not tokenizer:
                entry = (model, tokenizer, self._new_engine(model, tokenizer))
                self._engines[id(model)] = entry
            return entry[2]

    def generate_optimized(
        self,
        model: Model,
        tokenizer: Tokenizer,
        prompt: Prompt,
        max_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.95,
        repetition_penalty: float = 1.1,
        stream: bool = True,
        stop_sequences: str | Sequence[str] | None = None,
        *,
        json_schema: dict[str, Any] | bool | str | None = None,
        json_object: bool = False,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> Iterator[str]:
        """Yield the generated text: chunks as they come (``stream=True``) or the whole text
        at once. ``prompt`` may be text, chat messages (through the chat template) or token
        ids; generation stops before the first of ``stop_sequences`` (of any length; one
        string or several). At most one of ``json_schema``, ``json_object``, ``regex`` and
        ``grammar`` (Lark) constrains the output, which then ends once it is complete."""
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=stop_sequences or [],
            json_schema=json_schema,
            json_object=json_object,
            regex=regex,
            grammar=grammar,
        )
        events = self.engine(model, tokenizer).stream([prompt], params)
        if stream:
            for event in events:
                if event.error is not None:
                    raise event.error
                if event.text:
                    yield event.text
            return
        parts = []
        for event in events:
            if event.error is not None:
                raise event.error
            parts.append(event.text)
        yield "".join(parts)

    def _new_engine(self, model: Model, tokenizer: Tokenizer, batch_size: int | None = None) -> Engine:
        c = self.config
        return Engine(
            model,
            tokenizer,
            max_batch_size=batch_size or c.batch_size,
            kv_cache_tokens=self._kv_cache_tokens(model, batch_size),
            kv_cache_size=c.kv_cache_size,
            # Learned positions (GPT-2) end at the context: no rotation for them.
            rotating_kv_cache=c.rotating_kv_cache and not model.config.get("learned_positions"),
        )

    def create_pipeline(self, models: Sequence[Stage], batch_size: int | None = None) -> Pipeline:
        """Chain models: the first generates from the prompts, each next one from the
        previous one's outputs (draft, then rewrite...). Each stage is a model, whose
        tokenizer is loaded from beside it (the folder or GGUF file it came from), or a
        ``(model, tokenizer)`` pair. Each stage runs its prompts as one batch on its own
        engine, ``batch_size`` requests per step (default ``config.batch_size``)."""
        if not models:
            raise ValueError("a pipeline needs at least one model (or (model, tokenizer) pair)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        stages = [self._stage(i, stage) for i, stage in enumerate(models)]
        return Pipeline([self._new_engine(m, t, batch_size) for m, t in stages])

    def _stage(self, index: int, stage: Stage) -> tuple[Model, Tokenizer]:
        if isinstance(stage, Model):
            known = self._engines.get(id(stage))
            if known is not None and known[0] is stage:
                return stage, known[1]
            try:
                return stage, load_tokenizer(stage.path)
            except CortexError as err:
                raise TokenizerError(
                    f"create_pipeline: stage {index} has no tokenizer beside its model ({stage.path}): "
                    f"{err}; pass a (model, tokenizer) pair",
                    path=stage.path,
                ) from err
        if (
            isinstance(stage, tuple)
            and len(stage) == 2
            and isinstance(stage[0], Model)
            and isinstance(stage[1], Tokenizer)
        ):
            return stage[0], stage[1]
        raise TypeError(
            f"create_pipeline: stage {index} is a {type(stage).__name__}; "
            "expected a cortex.Model or a (Model, Tokenizer) pair"
        )

    def accelerate_transformer(
        self,
        model: Model,
        num_heads: int | None = None,
        head_dim: int | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        bits: int | None = None,
        example_input: Sequence[int] | None = None,
    ) -> Model:
        """Prepare a transformer for generation: requantize its linear layers to ``bits``
        (see :meth:`quantize_model`; left as stored when ``None``), warm it up, and, given
        its tokenizer, start the engine this accelerator will run it on. Returns the model
        to use (a new one when requantized).

        ``num_heads`` and ``head_dim`` (the original's arguments) state the attention
        layout the caller expects. The engine's fused attention always runs the layout the
        model's config gives; a value that differs from it is named in a
        :class:`cortex.CortexWarning`, since it means the caller has another model in mind.
        Both are ints; the tokenizer is passed by keyword (``tokenizer=tok``), and one given
        in their place (the older ``accelerate_transformer(model, tok)``) is a ``TypeError``.
        """
        for name, given in (("num_heads", num_heads), ("head_dim", head_dim)):
            if given is not None and (isinstance(given, bool) or not isinstance(given, numbers.Integral)):
                hint = (
                    "; pass the tokenizer by keyword: accelerate_transformer(model, tokenizer=tok)"
                    if isinstance(given, Tokenizer)
                    else ""
                )
                raise TypeError(
                    f"accelerate_transformer: {name} must be an int, got {type(given).__name__}{hint}"
                )
        config = model.config
        heads = int(config["num_attention_heads"])
        dim = int(config["head_dim"])
        for name, given, actual in (("num_heads", num_heads, heads), ("head_dim", head_dim, dim)):
            if given is not None and given != actual:
                warnings.warn(
                    f"accelerate_transformer: {name}={given}, but this model has {name}={actual} "
                    f"(num_attention_heads={heads}, head_dim={dim} in its config); its own layout is used",
                    CortexWarning,
                    stacklevel=2,
                )
        if bits is not None:
            model = self.quantize_model(model, bits)
        self.optimize_model(model, example_input)
        if tokenizer is not None:
            self.engine(model, tokenizer)
        return model

    # ── Model preparation and measurement ─────────────────────────────────────────────────

    def optimize_model(self, model: Model, example_input: Sequence[int] | None = None) -> Model:
        """Place ``model`` (CPU, float32 activations) and warm it up with one forward pass
        over ``example_input`` (default: 16 tokens), so the first real call does not pay
        for thread-pool start-up and first-touch allocations. Returns the model."""
        ids = list(example_input) if example_input is not None else [1] * 16
        start = time.perf_counter()
        model.forward(ids)
        self.last_warmup_seconds = time.perf_counter() - start
        return model

    def profile_model(
        self, model: Model, input_shape: tuple[int, int] = (1, 128), num_iterations: int = 100
    ) -> dict[str, Any]:
        """Time ``num_iterations`` real forward passes over a batch of ``input_shape =
        (batch, seq_len)`` token ids (run side by side, as the engine batches them).
        ``throughput`` is in samples (sequences) per second, as the original reported it;
        ``tokens_per_second`` counts the positions processed."""
        batch, seq_len = input_shape
        if batch < 1 or seq_len < 1 or num_iterations < 1:
            raise ValueError("input_shape entries and num_iterations must be at least 1")
        vocab = int(model.config["vocab_size"])
        seqs = [[(7 + 31 * b + 17 * i) % vocab for i in range(seq_len)] for b in range(batch)]
        model.forward_batch(seqs)  # warm-up
        start = time.perf_counter()
        for _ in range(num_iterations):
            model.forward_batch(seqs)
        avg = (time.perf_counter() - start) / num_iterations
        return {
            "avg_inference_time": avg,
            "throughput": batch / avg,
            "tokens_per_second": batch * seq_len / avg,
            "num_parameters": model.num_parameters,
            "dtype": model.dtype,
            "device": model.device,
            "batch_size": batch,
            "seq_len": seq_len,
            "num_iterations": num_iterations,
        }

    def optimize_memory(self, model: Model) -> Model:
        """Quantize a float model to ``config.quantization_bits`` (lossy: weights are
        rounded), the least memory this accelerator's config allows.

        Weights are most of a model's memory, so a model whose linear layers are stored as
        floats (``model.quantized`` is false) is packed to ``config.quantization_bits`` (see
        :meth:`quantize_model`); a model that is quantized already is returned as it is, as
        requantizing would round twice. Returns the model to use; ``last_memory_report``
        says what was done."""
        before = model.weight_bytes
        if not model.quantized:
            out = self.quantize_model(model)
            action = f"packed float weights to {self.config.quantization_bits} bits"
        else:
            out = model
            action = "kept: weights are quantized already"
        self.last_memory_report = {
            "weight_bytes_before": before,
            "weight_bytes_after": out.weight_bytes,
            "action": action,
        }
        return out

    def quantize_model(
        self, model: Model, bits: int | None = None, mixed_precision: bool | None = None, group_size: int = 32
    ) -> Model:
        """A copy of ``model`` with every linear layer requantized to packed MLX affine
        groups of ``bits`` (default ``config.quantization_bits``), kept packed in memory and
        multiplied as such. With ``mixed_precision`` (default ``config.mixed_precision``)
        the output head, the layer most sensitive to rounding, keeps 8 bits. Groups of 32
        by default: sources are often 4-bit already, in blocks of 32, and wider groups would
        add a second rounding on top. Embeddings and norms are shared unchanged."""
        bits = self.config.quantization_bits if bits is None else bits
        mixed = self.config.mixed_precision if mixed_precision is None else mixed_precision
        return model.requantize(bits, head_bits=max(bits, 8) if mixed else bits, group_size=group_size)

    @staticmethod
    def benchmark_operation(
        operation: str | Callable[..., Any],
        input_shape: Sequence[int],
        num_iterations: int = 1000,
        use_amx: bool = True,
        flops: float | None = None,
    ) -> dict[str, Any]:
        """Time an operation of the engine (``"matmul"``: ``(m, k, n)``, float;
        ``"qmatmul"``: the same with quantized weights, 4 bits in groups of 32 unless the
        shape is ``(m, k, n, bits, group_size)``; ``"attention"``: ``(seq_len, heads,
        head_dim)``, causal; ``"bandwidth"``: ``(megabytes,)``, a parallel read of a buffer)
        or a Python callable. Callable on the class, as the original was.

        A callable that takes an argument is called with one standard-normal float32 input
        of ``input_shape``, built once before timing in the framework the callable computes
        with: a torch tensor (``torch.from_numpy``) for a torch function (torch functions
        do not take numpy arrays); an mlx array (``mx.random.normal``) for an mlx function,
        or for one that names no framework (``lambda x: x @ x.T``) while mlx is imported; a
        numpy array otherwise. ``input_framework`` in the result says which. Each result is
        forced inside the timed loop (``mx.eval`` for mlx, ``numpy.asarray`` for numpy), so
        lazy frameworks' work is timed. A callable that takes no argument is called as it
        is. Either is called 10 times before timing, as the original did.

        ``flops`` is the work of one call. When it is not given, a callable given an array
        is counted as ``2 * prod(input_shape) * input_shape[-1]`` FLOPs, the input times a
        square matrix of its width (the original's count; exact for ``x @ x.T`` on a square
        ``x``), and the result says so with ``flops_assumed: True``; other callables have no
        count. The result has GFLOP/s (``gflops``, ``None`` without a count), GB/s of the
        bytes an engine operation reads (weights, KV or buffer) and the original's keys
        (``avg_time_ms``, ``throughput_gflops``: ``0.0`` without a count, as the original
        reported it, so it always formats as a number; ``amx_enabled``: whether the engine's
        kernels ran on AMX, which ``use_amx`` allows for this call where the CPU grants it,
        for products of 9 or more rows)."""
        if num_iterations < 1:
            raise ValueError("num_iterations must be at least 1")
        nbytes: float | None = None
        assumed = False
        framework: str | None = None
        amx = False
        if callable(operation):
            shape = tuple(int(d) for d in input_shape)
            call: Callable[[], Any]
            finish: Callable[[], None] = lambda: None  # noqa: E731
            if _takes_argument(operation):
                framework, call, finish = _array_call(operation, shape)
                if flops is None and len(shape) >= 2:
                    flops, assumed = 2.0 * float(np.prod(shape)) * shape[-1], True
            else:
                call = operation
            for _ in range(_WARMUP_CALLS):
                call()
            finish()
            start = time.perf_counter()
            for _ in range(num_iterations):
                call()
            finish()
            seconds, per_call = time.perf_counter() - start, flops
            name = getattr(operation, "__name__", "callable")
        else:
            with amx_allowed(use_amx):
                # Only the quantized products of `amx_min_rows()` rows or more run on AMX.
                amx = (
                    _core.kernel_isa() == "amx"
                    and operation == "qmatmul"
                    and input_shape[0] >= _core.amx_min_rows()
                )
                seconds, per_call, nbytes = _core.time_operation(operation, list(input_shape), num_iterations)
            name = operation
        avg = seconds / num_iterations
        gflops = per_call / avg / 1e9 if per_call else None
        return {
            "operation": name,
            "input_shape": tuple(input_shape),
            "input_framework": framework,
            "num_iterations": num_iterations,
            "avg_time": avg,
            "avg_time_ms": avg * 1e3,
            "flops": per_call,
            "flops_assumed": assumed,
            "gflops": gflops,
            "throughput_gflops": gflops if gflops is not None else 0.0,
            "bytes": nbytes,
            "gbytes_per_s": nbytes / avg / 1e9 if nbytes else None,
            "use_amx": amx,
            "amx_enabled": amx,
            "amx_requested": use_amx,
        }

    class _DeviceInfo:
        """``get_device_info`` works on the class (the original's static method: the
        settings reported are a default :class:`MLXConfig`'s; no instance is made, so a
        subclass whose constructor takes arguments works too) and on an instance (its own
        config's)."""

        def __get__(
            self, accelerator: MLXAccelerator | None, owner: type[MLXAccelerator]
        ) -> Callable[[], dict[str, Any]]:
            if accelerator is not None:
                return lambda: accelerator._device_info(
                    accelerator.config, accelerator.device, accelerator.dtype
                )
            return lambda: owner._device_info(MLXConfig(), _placement("auto", None), _ACTIVATION_DTYPE)

    get_device_info = _DeviceInfo()

    @staticmethod
    def _device_info(c: MLXConfig, device: str, dtype: str) -> dict[str, Any]:
        """The device, CPU model and features, memory, and how each setting of ``c``
        applies."""
        model, flags = _cpu()
        mem = _meminfo()
        features = {
            name: flag in flags
            for name, flag in [
                ("avx2", "avx2"),
                ("fma", "fma"),
                ("f16c", "f16c"),
                ("avx512f", "avx512f"),
                ("avx512_vnni", "avx512_vnni"),
                ("avx_vnni", "avx_vnni"),
                ("amx_tile", "amx_tile"),
                ("amx_int8", "amx_int8"),
                ("amx_bf16", "amx_bf16"),
            ]
        }
        settings: dict[str, dict[str, Any]] = {
            name: {"value": getattr(c, name), "applied": False, "reason": why}
            for name, why in _NOT_APPLICABLE.items()
        }
        applied = {
            "batch_size": "the engine's max_batch_size",
            "memory_fraction": "caps the KV cache at this share of available memory",
            "rotating_kv_cache": "the engine's rotating cache",
            "kv_cache_size": "the engine's per-request cache size",
            "quantization_bits": "default bits of quantize_model",
            "mixed_precision": "quantize_model keeps the output head at 8 bits",
        }
        settings.update(
            {n: {"value": getattr(c, n), "applied": True, "reason": why} for n, why in applied.items()}
        )
        settings["dtype"] = {
            "value": c.dtype,
            "applied": c.dtype == "float32",
            "reason": "activations are float32 (CPU and GPU); weights keep their stored precision",
        }
        amx_available = _core.amx_available()
        settings["use_amx"] = {
            "value": c.use_amx,
            "applied": amx_available,
            "reason": (
                "quantized products of 9 or more rows run on AMX int8 tiles unless this is False"
                " (process-wide)"
                if amx_available
                else "no AMX here: the CPU does not list it, the OS does not grant it, or a trial failed"
            ),
        }
        gpu: dict[str, Any] | None = None
        if device.startswith("cuda"):
            ordinal = int(device.partition(":")[2] or 0)
            info = _core.cuda_info(ordinal)
            major, minor = info["compute_capability"]
            driver_major, driver_minor = info["driver_version"]
            gpu = {
                "index": ordinal,
                "name": info["name"],
                "memory_total": info["total_memory"],
                "memory_free": info["free_memory"],
                "compute_capability": f"{major}.{minor}",
                "driver_cuda_version": f"{driver_major}.{driver_minor}",
            }
        return {
            "device": device,
            "is_gpu": gpu is not None,
            "gpu": gpu,
            "dtype": dtype,
            # The original's key: the dtype arrays are created in (here, activations').
            "default_dtype": dtype,
            "cpu_model": model,
            "cpu_count": os.cpu_count(),
            "threads": int(os.environ.get("CORTEX_NUM_THREADS") or os.cpu_count() or 1),
            "cpu_features": features,
            # The instruction set our quantized kernels run with (CORTEX_KERNEL can lower it).
            "kernels": _core.kernel_isa(),
            # AMX granted to this process, and in use now (granted, and allowed by use_amx).
            "amx_available": amx_available,
            "amx_in_use": _core.kernel_isa() == "amx",
            "memory_total": mem.get("MemTotal"),
            "memory_available": mem.get("MemAvailable"),
            "settings": settings,
            "config": dataclasses.asdict(c),
        }
