"""``MLXAccelerator`` and ``MLXConfig``: the original project's notebook API on Cortex's engine.

Every setting either changes what the engine does or is reported by
:meth:`MLXAccelerator.get_device_info` as not applicable on this backend (with the reason);
none is silently ignored.

>>> acc = cortex.MLXAccelerator()
>>> for chunk in acc.generate_optimized(model, tokenizer, "Tell me about Rust", max_tokens=64):
...     print(chunk, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import _core
from ._core import Model, SamplingParams, Tokenizer
from .engine import Engine
from .generation import Prompt

__all__ = ["OPTIMIZATION_PRESETS", "MLXAccelerator", "MLXConfig", "Pipeline"]

_DTYPES = ("float32", "float16", "bfloat16")
_BITS = (2, 3, 4, 5, 6, 8)


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
    dtype: str = "bfloat16"
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
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: one of {', '.join(_DTYPES)}")
        if self.kv_cache_size < 8:
            raise ValueError(f"kv_cache_size={self.kv_cache_size}: must be at least 8")
        if self.quantization_bits not in _BITS:
            raise ValueError(f"quantization_bits={self.quantization_bits}: one of {_BITS}")
        if self.prefetch_size < 0 or self.fusion_threshold < 0:
            raise ValueError("prefetch_size and fusion_threshold must not be negative")


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

    def __call__(self, prompts: Sequence[Prompt], **sampling: Any) -> list[str]:
        """Run ``prompts`` through every stage; returns the last stage's texts, in order.
        ``sampling``: :class:`cortex.SamplingParams` fields, for every stage."""
        texts: Sequence[Prompt] = list(prompts)
        for engine in self.engines:
            outs = engine.generate_batch(texts, **sampling)
            for out in outs:
                if out.error is not None:
                    raise out.error
            texts = [out.text for out in outs]
        return [str(t) for t in texts]


class MLXAccelerator:
    """Runs models on Cortex's engine with the settings of an :class:`MLXConfig`."""

    OPTIMIZATION_PRESETS = OPTIMIZATION_PRESETS

    def __init__(self, config: MLXConfig | None = None) -> None:
        self.config = config or MLXConfig()
        self.device = "cpu"
        #: CPU activations are float32 whatever ``config.dtype`` asks for.
        self.dtype = "float32"
        self._engines: dict[int, tuple[Model, Tokenizer, Engine]] = {}
        self._lock = threading.Lock()

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
        stop_sequences: Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Yield the generated text: chunks as they come (``stream=True``) or the whole text
        at once. ``prompt`` may be text, chat messages (through the chat template) or token
        ids; generation stops before the first of ``stop_sequences`` (of any length)."""
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=list(stop_sequences or []),
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

    def create_pipeline(
        self, models: Sequence[tuple[Model, Tokenizer]], batch_size: int | None = None
    ) -> Pipeline:
        """Chain models: the first generates from the prompts, each next one from the
        previous one's outputs (draft, then rewrite...). Each stage runs its prompts as one
        batch on its own engine, ``batch_size`` requests per step (default
        ``config.batch_size``)."""
        if not models:
            raise ValueError("a pipeline needs at least one (model, tokenizer) pair")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        return Pipeline([self._new_engine(m, t, batch_size) for m, t in models])

    def accelerate_transformer(
        self,
        model: Model,
        tokenizer: Tokenizer | None = None,
        bits: int | None = None,
        example_input: Sequence[int] | None = None,
    ) -> Model:
        """Prepare a transformer for generation: requantize its linear layers to ``bits``
        (see :meth:`quantize_model`; left as stored when ``None``), warm it up, and, given
        its tokenizer, start the engine this accelerator will run it on. Returns the model
        to use (a new one when requantized)."""
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
        (batch, seq_len)`` token ids (run side by side, as the engine batches them)."""
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
            "throughput": batch * seq_len / avg,  # tokens per second
            "num_parameters": model.num_parameters,
            "dtype": model.dtype,
            "device": model.device,
            "batch_size": batch,
            "seq_len": seq_len,
            "num_iterations": num_iterations,
        }

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

    def benchmark_operation(
        self,
        operation: str | Callable[[], Any],
        input_shape: Sequence[int],
        num_iterations: int = 1000,
        use_amx: bool = True,
        flops: float | None = None,
    ) -> dict[str, Any]:
        """Time an operation of the engine (``"matmul"``: ``(m, k, n)``, float;
        ``"qmatmul"``: the same with quantized weights, 4 bits in groups of 32 unless the
        shape is ``(m, k, n, bits, group_size)``; ``"attention"``: ``(seq_len, heads,
        head_dim)``, causal; ``"bandwidth"``: ``(megabytes,)``, a parallel read of a buffer)
        or a Python callable (pass its ``flops`` per call for a GFLOP/s figure). The result
        has GFLOP/s and GB/s of the bytes the operation reads (weights, KV or buffer). AMX is
        never used: it is unavailable on this backend (``use_amx`` is reported, not
        applied)."""
        if num_iterations < 1:
            raise ValueError("num_iterations must be at least 1")
        if callable(operation):
            operation()  # warm-up
            start = time.perf_counter()
            for _ in range(num_iterations):
                operation()
            seconds, per_call, nbytes = time.perf_counter() - start, flops, None
            name = getattr(operation, "__name__", "callable")
        else:
            seconds, per_call, nbytes = _core.time_operation(operation, list(input_shape), num_iterations)
            name = operation
        avg = seconds / num_iterations
        return {
            "operation": name,
            "input_shape": tuple(input_shape),
            "num_iterations": num_iterations,
            "avg_time": avg,
            "flops": per_call,
            "gflops": per_call / avg / 1e9 if per_call else None,
            "bytes": nbytes,
            "gbytes_per_s": nbytes / avg / 1e9 if nbytes else None,
            "use_amx": False,
            "amx_requested": use_amx,
        }

    def get_device_info(self) -> dict[str, Any]:
        """The device, CPU model and features, memory, and how each setting applies."""
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
        c = self.config
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
            "reason": "CPU activations are float32; weights keep their stored precision",
        }
        settings["use_amx"] = {
            "value": c.use_amx,
            "applied": False,
            "reason": "AMX is not used: the CPU may list it, but no kernel here has proven it safe",
        }
        return {
            "device": self.device,
            "is_gpu": False,
            "dtype": self.dtype,
            "cpu_model": model,
            "cpu_count": os.cpu_count(),
            "threads": int(os.environ.get("CORTEX_NUM_THREADS") or os.cpu_count() or 1),
            "cpu_features": features,
            # The instruction set our quantized kernels run with (CORTEX_KERNEL can lower it).
            "kernels": _core.kernel_isa(),
            "memory_total": mem.get("MemTotal"),
            "memory_available": mem.get("MemAvailable"),
            "settings": settings,
            "config": dataclasses.asdict(c),
        }
