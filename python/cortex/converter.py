"""Model conversion: Hugging Face folders, PyTorch checkpoints, GGUF files and MLX folders
into MLX-layout quantized models that Cortex runs and mlx-lm reads (or one GGUF file).

A facade over one Rust call, ``cortex._core.convert``, which opens the source once, plans
every tensor (recipe, mixed precision, the predicate, called back here), quantizes, writes
and validates. This side keeps the original API and publishes the output atomically with
its ``conversion.json`` (:mod:`cortex._outputs`); Ctrl-C cancels the Rust step cleanly.

>>> from cortex import MLXConverter, ConversionConfig, QuantizationRecipe
>>> ok, message, path = MLXConverter().convert_model("HuggingFaceTB/SmolLM2-135M-Instruct")
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from . import _core, hub
from ._outputs import ConversionCache, building, check_existing, restore_interrupted_swap
from ._progress import with_progress
from .accelerator import amx_allowed
from .exceptions import CortexError
from .models import cortex_home

__all__ = ["SUPPORTED_CHIPS", "ConversionConfig", "ConversionFormat", "MLXConverter", "QuantizationRecipe"]


class QuantizationRecipe(Enum):
    """How much to compress: bits per weight for attention/MLP/embedding matrices. From a
    quantized GGUF source no tensor goes below the precision it is stored at."""

    SPEED_4BIT = "4bit"
    BALANCED_5BIT = "5bit"
    QUALITY_8BIT = "8bit"
    MIXED_PRECISION = "mixed"
    NONE = "none"


class ConversionFormat(Enum):
    """The format of the source model."""

    HUGGINGFACE = "huggingface"
    SAFETENSORS = "safetensors"
    PYTORCH = "pytorch"
    GGUF = "gguf"


@dataclass
class ConversionConfig:
    """Settings of one conversion (the original fields and defaults, plus ``output_format``).

    The source's format is detected from its files; an explicit ``source_format`` other than
    ``HUGGINGFACE`` must agree with what is found. ``group_size`` is one of
    ``cortex._core.SUPPORTED_GROUP_SIZES``. ``mixed_precision_config`` may set
    ``critical_layers``, ``critical_bits``, ``standard_bits`` and ``predicate``: a callable
    ``(path, shape)`` or ``(path, module, config)`` returning a bool or ``{"bits",
    "group_size"}``. ``use_amx``: validation's forward passes may run on Intel AMX where
    the CPU grants it (for the duration of the conversion). ``use_amx`` and
    ``compile_model`` are recorded in ``conversion.json``; ``compile_model`` selects
    nothing on this backend.
    """

    source_format: ConversionFormat = ConversionFormat.HUGGINGFACE
    quantization: QuantizationRecipe = QuantizationRecipe.SPEED_4BIT
    group_size: int = 64
    mixed_precision_config: dict[str, Any] | None = None
    cache_converted: bool = True
    validate_conversion: bool = True
    use_amx: bool = True
    compile_model: bool = True
    output_format: str = "mlx"


# GPU cores and memory bandwidth (GB/s) of Apple chips, recorded by `optimize_for_chip`.
# fmt: off
_CHIPS = [
    ("m1", 8, 68), ("m1_pro", 16, 200), ("m1_max", 32, 400), ("m1_ultra", 64, 800),
    ("m2", 10, 100), ("m2_pro", 19, 200), ("m2_max", 38, 400), ("m2_ultra", 76, 800),
    ("m3", 10, 100), ("m3_pro", 18, 150), ("m3_max", 40, 400),
    ("m4", 10, 120), ("m4_pro", 20, 273), ("m4_max", 40, 546),
]
# fmt: on
SUPPORTED_CHIPS: dict[str, dict[str, int]] = {
    chip: {"gpu_cores": cores, "memory_bandwidth_gbps": gbps} for chip, cores, gbps in _CHIPS
}


class _Module:
    """What a 3-argument predicate receives as ``module``: ``weight.shape`` and a
    ``to_quantized`` marker, enough for the predicates mlx-lm users write."""

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.weight = path, SimpleNamespace(shape=shape)

    def to_quantized(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - marker
        """Present so that ``hasattr(module, "to_quantized")`` holds."""


def _predicate(pred: Any) -> Callable[[str, tuple[int, ...], dict[str, Any]], Any] | None:
    """The user's predicate as the ``(path, shape, config)`` callable Rust calls."""
    if pred is None:
        return None
    if not callable(pred):
        raise ValueError("mixed_precision_config['predicate'] must be callable")
    try:
        n = len(inspect.signature(pred).parameters)
    except (TypeError, ValueError):
        n = 2
    if n >= 3:
        return lambda path, shape, config: pred(path, _Module(path, shape), config)
    return lambda path, shape, _config: pred(path, shape)


def resolve_source(source: str) -> Path:
    """A local path, or a repo id fetched from (or found offline in) the Hugging Face cache."""
    path = hub.resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {source}")
    return path


def default_output_name(source: str, recipe: QuantizationRecipe) -> str:
    """``org_name`` for repo ids, the folder (or file stem) name for paths, plus ``_<recipe>``."""
    path = Path(source).expanduser()
    if hub.is_repo_id(source):
        return f"{source.replace('/', '_')}_{recipe.value}"
    return f"{path.stem if path.is_file() else path.resolve().name}_{recipe.value}"


class MLXConverter:
    """Converts models into the MLX layout (or GGUF) under a cache directory.

    Args:
        cache_dir: where converted models go; default ``~/.cortex/mlx_models``
            (``$CORTEX_HOME/mlx_models``).
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cortex_home() / "mlx_models"
        self.cache_file = self.cache_dir / "conversion_cache.json"

    def convert_model(
        self, source_path: str, output_name: str | None = None, config: ConversionConfig | None = None
    ) -> tuple[bool, str, Path | None]:
        """Converts ``source_path`` (a local folder or file, or a repo id in the local Hugging
        Face cache) and returns ``(ok, message, output_path)``; failures give
        ``(False, message, None)`` and leave nothing that looks like a finished model."""
        config = config or ConversionConfig()
        name = output_name or default_output_name(str(source_path), config.quantization)
        try:
            if output_name is None and config.cache_converted:
                # An earlier conversion of the same source and settings, under any name.
                wanted = _wanted(resolve_source(str(source_path)).resolve(), config, None)
                cached = ConversionCache(self.cache_dir).get(wanted)
                reused = check_existing(cached, wanted, reuse=True) if cached else None
                if reused is not None and reused[0]:
                    return reused
            return self._convert(str(source_path), self.cache_dir / name, config)
        except (CortexError, OSError, ValueError) as e:
            return False, f"Conversion of {source_path} failed: {e}", None

    def _convert(
        self,
        source_path: str,
        output: Path,
        config: ConversionConfig,
        bits_override: int | None = None,
        max_shard_bytes: int | None = None,
    ) -> tuple[bool, str, Path | None]:
        start = time.monotonic()
        source = resolve_source(source_path)
        src_abs, out_abs = source.resolve(), output.expanduser().resolve()
        if out_abs == src_abs or src_abs in out_abs.parents or out_abs in src_abs.parents:
            return False, f"output {out_abs} would overwrite or sit inside the source {src_abs}", None
        restore_interrupted_swap(out_abs)
        wanted = _wanted(src_abs, config, bits_override)
        existing = check_existing(out_abs, wanted, reuse=config.cache_converted)
        if existing is not None:
            return existing
        mp = config.mixed_precision_config or {}
        options: dict[str, Any] = {
            "quantization": config.quantization.value,
            "group_size": config.group_size,
            **{k: mp.get(k) for k in ("critical_layers", "critical_bits", "standard_bits")},
            "predicate": _predicate(mp.get("predicate")),
            "bits_override": bits_override,
            "output_format": config.output_format,
            "source_format": config.source_format.value,
            "validate": config.validate_conversion,
            **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}),
        }
        with building(out_abs) as tmp:
            target = tmp / f"{out_abs.name}.gguf" if config.output_format == "gguf" else tmp
            with amx_allowed(config.use_amx):
                done = with_progress(
                    "converting", "tensor", lambda p: _core.convert(source, target, **options, progress=p)
                )
            record = {
                **wanted,
                "use_amx": config.use_amx,
                "compile_model": config.compile_model,
                **done,
                "quality": done["quality"] or {},
                "cortex_version": _core.__version__,
                "duration_s": round(time.monotonic() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if config.cache_converted:
            ConversionCache(self.cache_dir).remember(wanted, out_abs)
        quality, bits = record["quality"], record["bits_used"]
        what = f"{record['bits']}-bit, group {config.group_size}" if record["bits"] else "float"
        if len(bits) > 1:
            what = f"mixed {'/'.join(map(str, bits))}-bit, group {config.group_size}"
        checked = (
            f"; validation over {quality['tokens']} tokens: mean KL {quality['mean_kl']:.4f}, "
            f"top-1 agreement {quality['top1_agreement']:.1%}"
            if "mean_kl" in quality
            else ""
        )
        size_mb = sum(f.stat().st_size for f in out_abs.rglob("*") if f.is_file()) / 1e6
        message = (
            f"Converted {source_path} to {out_abs} ({what}, {record['bits_per_weight']:.2f} bits/weight, "
            f"{size_mb:.1f} MB) in {record['duration_s']:.1f} s{checked}"
        )
        return True, message, out_abs

    def list_converted_models(self) -> dict[str, dict[str, Any]]:
        """Converted models in the cache directory: name → path, size_gb, bits, recipe,
        group_size, use_amx (the flag it was converted with), source."""
        return {
            d.name: {
                "path": str(d),
                "size_gb": sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e9,
                **{k: record.get(k) for k in ("bits", "recipe", "group_size", "source")},
                "use_amx": record.get("use_amx", False),
            }
            for d, record in ConversionCache(self.cache_dir).records()
        }

    def optimize_for_chip(self, model_path: str | Path, chip: str) -> bool:
        """Records ``chip_optimization`` (the chip's name, GPU cores and memory bandwidth) in
        the model's ``config.json``, for MLX runtimes on that Apple chip. Raises ``ValueError``
        for an unknown chip and ``FileNotFoundError`` when there is no config.json."""
        key = chip.lower().replace(" ", "_").replace("-", "_")
        if key not in SUPPORTED_CHIPS:
            raise ValueError(f"unknown chip {chip!r}; supported: {', '.join(SUPPORTED_CHIPS)}")
        config_path = Path(model_path).expanduser() / "config.json"
        config = json.loads(config_path.read_text())
        config["chip_optimization"] = {"chip": key, **SUPPORTED_CHIPS[key]}
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)
        return True


def _wanted(source: Path, config: ConversionConfig, bits_override: int | None) -> dict[str, Any]:
    """The fields of ``conversion.json`` that make two conversions the same."""
    return {
        "source": str(source),
        "recipe": config.quantization.value,
        "group_size": config.group_size,
        "bits_override": bits_override,
        "output_format": config.output_format,
    }
