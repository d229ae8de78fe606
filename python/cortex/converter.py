"""Model conversion: Hugging Face folders, PyTorch checkpoints, GGUF files and MLX folders
into MLX-layout quantized models that Cortex runs and mlx-lm reads (or one GGUF file).

A facade over one Rust call, ``cortex._core.convert``: it opens the source once, plans every
tensor (recipe, mixed precision, the predicate, which Rust calls back here), quantizes,
writes and validates (top-1 agreement and KL against the source, both computed in f32).
This side keeps the original API, the cache of earlier conversions and the atomic
publishing: output is built in a temporary sibling directory and renamed into place only
once complete and validated. Ctrl-C cancels the Rust step cleanly.

>>> from cortex import MLXConverter, ConversionConfig, QuantizationRecipe
>>> ok, message, path = MLXConverter().convert_model("HuggingFaceTB/SmolLM2-135M-Instruct")
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from . import _core, hub
from ._progress import with_progress
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
    "group_size"}``. ``use_amx`` and ``compile_model`` are recorded in ``conversion.json``;
    they select nothing at conversion time on this backend.
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


# Memory bandwidth (GB/s) and GPU cores of Apple chips, recorded by `optimize_for_chip`.
SUPPORTED_CHIPS: dict[str, dict[str, int]] = {
    "m1": {"gpu_cores": 8, "memory_bandwidth_gbps": 68},
    "m1_pro": {"gpu_cores": 16, "memory_bandwidth_gbps": 200},
    "m1_max": {"gpu_cores": 32, "memory_bandwidth_gbps": 400},
    "m1_ultra": {"gpu_cores": 64, "memory_bandwidth_gbps": 800},
    "m2": {"gpu_cores": 10, "memory_bandwidth_gbps": 100},
    "m2_pro": {"gpu_cores": 19, "memory_bandwidth_gbps": 200},
    "m2_max": {"gpu_cores": 38, "memory_bandwidth_gbps": 400},
    "m2_ultra": {"gpu_cores": 76, "memory_bandwidth_gbps": 800},
    "m3": {"gpu_cores": 10, "memory_bandwidth_gbps": 100},
    "m3_pro": {"gpu_cores": 18, "memory_bandwidth_gbps": 150},
    "m3_max": {"gpu_cores": 40, "memory_bandwidth_gbps": 400},
    "m4": {"gpu_cores": 10, "memory_bandwidth_gbps": 120},
    "m4_pro": {"gpu_cores": 20, "memory_bandwidth_gbps": 273},
    "m4_max": {"gpu_cores": 40, "memory_bandwidth_gbps": 546},
}


class _Module:
    """What a 3-argument predicate receives as ``module``: ``weight.shape`` and a
    ``to_quantized`` marker, enough for the predicates mlx-lm users write."""

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.weight = path, type("Weight", (), {"shape": shape})()

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
    base = (
        source.replace("/", "_")
        if hub.is_repo_id(source)
        else path.stem
        if path.is_file()
        else path.resolve().name
    )
    return f"{base}_{recipe.value}"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
                src = resolve_source(str(source_path)).resolve()
                cached = self._read_cache().get(_cache_key(src, config, None))
                if isinstance(cached, dict) and "path" in cached:
                    reused = self._check_existing(Path(cached["path"]), src, config, None)
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
        _restore_interrupted_swap(out_abs)
        existing = self._check_existing(out_abs, src_abs, config, bits_override)
        if existing is not None:
            return existing
        mp = dict(config.mixed_precision_config or {})
        options: dict[str, Any] = {
            "quantization": config.quantization.value,
            "group_size": config.group_size,
            "critical_layers": mp.get("critical_layers"),
            "critical_bits": mp.get("critical_bits"),
            "standard_bits": mp.get("standard_bits"),
            "predicate": _predicate(mp.get("predicate")),
            "bits_override": bits_override,
            "output_format": config.output_format,
            "source_format": config.source_format.value,
            "validate": config.validate_conversion,
        }
        if max_shard_bytes is not None:
            options["max_shard_bytes"] = max_shard_bytes
        out_abs.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_abs)
        tmp = out_abs.with_name(f".{out_abs.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        old = out_abs.with_name(f".{out_abs.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            target = tmp / f"{out_abs.name}.gguf" if config.output_format == "gguf" else tmp
            done = with_progress(
                "converting", "tensor", lambda p: _core.convert(source, target, **options, progress=p)
            )
            record = {
                "source": str(src_abs),
                "recipe": config.quantization.value,
                "group_size": config.group_size,
                "bits_override": bits_override,
                "output_format": config.output_format,
                "use_amx": config.use_amx,
                "compile_model": config.compile_model,
                **{k: v for k, v in done.items() if k != "files"},
                "quality": done["quality"] or {},
                "cortex_version": _core.__version__,
                "duration_s": round(time.monotonic() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
            # Replacing an earlier conversion takes two renames (POSIX cannot swap two
            # folders in one): the earlier one is moved aside first and deleted only once the
            # new one holds the name. An exception between them puts the earlier one back
            # below; a process killed there leaves it as `.NAME.old-PID-X`, which the next
            # conversion restores (`_restore_interrupted_swap`).
            if out_abs.exists():
                os.replace(out_abs, old)
            os.replace(tmp, out_abs)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if old.exists() and not out_abs.exists():
                os.replace(old, out_abs)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if config.cache_converted:
            self._remember(_cache_key(src_abs, config, bits_override), out_abs)
        quality = record["quality"]
        checked = ""
        if "mean_kl" in quality:
            checked = (
                f"; validation over {quality['tokens']} tokens: mean KL {quality['mean_kl']:.4f}, "
                f"top-1 agreement {quality['top1_agreement']:.1%}"
            )
        bits = record["bits_used"]
        what = f"{record['bits']}-bit, group {config.group_size}" if record["bits"] else "float"
        if config.quantization is QuantizationRecipe.MIXED_PRECISION or len(bits) > 1:
            what = f"mixed {'/'.join(map(str, bits))}-bit, group {config.group_size}"
        message = (
            f"Converted {source_path} to {out_abs} ({what}, {record['bits_per_weight']:.2f} bits/weight, "
            f"{_dir_size(out_abs) / 1e6:.1f} MB) in {record['duration_s']:.1f} s{checked}"
        )
        return True, message, out_abs

    def _check_existing(
        self, out: Path, src: Path, config: ConversionConfig, bits_override: int | None
    ) -> tuple[bool, str, Path | None] | None:
        """Reuses a valid existing output of the same conversion; refuses a different one."""
        if not out.exists():
            return None
        record_path = out / "conversion.json"
        if not record_path.is_file():
            return False, f"{out} exists and is not a Cortex conversion; choose another output name", None
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError:
            return False, f"{out} has an unreadable conversion.json; remove it or choose another name", None
        wanted = {
            "source": str(src),
            "recipe": config.quantization.value,
            "group_size": config.group_size,
            "bits_override": bits_override,
            "output_format": config.output_format,
        }
        mismatch = [f"{k} {record.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if record.get(k) != v]
        if mismatch:
            return (
                False,
                (
                    f"{out} already holds a different conversion: "
                    + ", ".join(mismatch)
                    + "; choose another output name"
                ),
                None,
            )
        if not config.cache_converted:
            return None  # same conversion, but the caller asked for a fresh one
        if not (out / "config.json").is_file():
            return False, f"{out} is incomplete (no config.json); remove it", None
        return True, f"Using the cached conversion at {out}", out

    def _remember(self, key: str, out: Path) -> None:
        cache = self._read_cache()
        cache[key] = {"path": str(out), "created": time.time()}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, self.cache_file)

    def _read_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self.cache_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def list_converted_models(self) -> dict[str, dict[str, Any]]:
        """Converted models in the cache directory: name → path, size_gb, bits, recipe,
        group_size, use_amx (the flag it was converted with), source."""
        models: dict[str, dict[str, Any]] = {}
        if not self.cache_dir.is_dir():
            return models
        for d in sorted(self.cache_dir.iterdir()):
            record_path = d / "conversion.json"
            if d.name.startswith(".") or not record_path.is_file():
                continue
            try:
                record = json.loads(record_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            models[d.name] = {
                "path": str(d),
                "size_gb": _dir_size(d) / 1e9,
                "bits": record.get("bits"),
                "recipe": record.get("recipe"),
                "group_size": record.get("group_size"),
                "use_amx": record.get("use_amx", False),
                "source": record.get("source"),
            }
        return models

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


def _cache_key(source: Path, config: ConversionConfig, bits_override: int | None) -> str:
    """`conversion_cache.json` key: source, recipe, group size (and bits / output format)."""
    return "|".join(
        str(x)
        for x in (
            source,
            config.quantization.value,
            config.group_size,
            bits_override or "",
            config.output_format,
        )
    )


def _restore_interrupted_swap(out: Path) -> None:
    """Puts back the earlier output that a conversion killed between its two renames had
    moved aside (``.NAME.old-PID-X``, complete, its process gone) while nothing holds
    ``out``; the newer, unfinished attempt is then an ordinary stale temporary."""
    if out.exists() or out.is_symlink():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.old-(\d+)-[0-9a-f]+$")
    aside = []
    for path in out.parent.iterdir() if out.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            aside.append(path)
    if aside:
        # One at most in practice; were there several, the latest moved aside is newest.
        os.replace(max(aside, key=lambda p: p.stat().st_mtime_ns), out)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Removes temporaries (``.NAME.tmp-PID-X`` being built, ``.NAME.old-PID-X`` being
    replaced) of earlier conversions to ``out`` whose process is gone: a conversion killed
    with SIGKILL cannot clean up after itself."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for tmp in out.parent.iterdir():
        match = pattern.match(tmp.name)
        if match and not _process_alive(int(match.group(2))):
            shutil.rmtree(tmp, ignore_errors=True)
