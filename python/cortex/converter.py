"""Model conversion: Hugging Face folders, PyTorch checkpoints, GGUF files and MLX folders
into MLX-layout quantized models that Cortex runs and mlx-lm reads.

The per-tensor plan (which matrices are quantized, at which bits and group size) is decided
here, because recipes may carry a Python predicate; reading, quantizing and writing happen in
Rust on a worker thread (``cortex._core.ConversionJob``) while this side shows progress and
turns Ctrl-C into a clean cancellation. Output is built in a temporary sibling directory and
renamed into place only once complete and validated.

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
from typing import Any, Callable, Union

import numpy as np

from . import _core, hub
from ._progress import progress_bar
from .exceptions import CortexError, ModelNotFoundError
from .models import cortex_home

__all__ = [
    "SUPPORTED_CHIPS",
    "ConversionConfig",
    "ConversionFormat",
    "MLXConverter",
    "QuantizationRecipe",
]

#: mlx-lm's largest shard.
MAX_SHARD_BYTES = 5 << 30
#: Tokens of the validation text (at least 256).
VALIDATION_TOKENS = 256


class QuantizationRecipe(Enum):
    """How much to compress: bits per weight for attention/MLP/embedding matrices."""

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


_RECIPE_BITS = {
    QuantizationRecipe.SPEED_4BIT: 4,
    QuantizationRecipe.BALANCED_5BIT: 5,
    QuantizationRecipe.QUALITY_8BIT: 8,
}

#: The original mixed-precision rule: critical layers at higher precision, attention and
#: MLP projections at the standard width, everything else float.
DEFAULT_MIXED_PRECISION: dict[str, Any] = {
    "critical_layers": ["lm_head", "embed_tokens", "wte", "wpe"],
    "critical_bits": 6,
    "standard_bits": 4,
}
_PROJECTIONS = re.compile(
    r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
    r"c_attn|c_proj|c_fc|fc1|fc2|dense|query_key_value|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|experts)"
)


@dataclass
class ConversionConfig:
    """Settings of one conversion (the original fields and defaults, plus ``output_format``).

    The source's format is detected from its files; an explicit ``source_format`` other than
    ``HUGGINGFACE`` must agree with what is found. ``use_amx`` and ``compile_model`` are
    recorded in ``conversion.json``; they select nothing at conversion time on this backend
    (kernels are chosen by CPU detection when a model runs).
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

#: A fixed English text for validation (public-domain prose, well over 256 tokens).
_VALIDATION_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way. In short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things "
    "in general were settled for ever. The mail coach rumbled up the hill in the dark, its lamps "
    "throwing small pools of yellow light on the wet road, while the guard kept one hand on the "
    "arm-chest and the other on his blunderbuss. Rust is a programming language that promises "
    "memory safety without a garbage collector: ownership, borrowing and lifetimes let the "
    "compiler prove that references never outlive the data they point to, and that no two threads "
    "ever write to the same memory at once. Quantization stores each group of weights as small "
    "integers with a scale and a bias, so a model that needed four bytes per weight can run from "
    "half a byte, trading a little accuracy for a large saving in memory and bandwidth. "
) * 2


# ── Plans ────────────────────────────────────────────────────────────────────────────────────


class _WeightView:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


class _ModuleView:
    """What a 3-argument predicate ``(path, module, config)`` receives: an object with
    ``weight.shape`` and ``to_quantized``, enough for the predicates mlx-lm users write."""

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path = path
        self.weight = _WeightView(shape)

    def to_quantized(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - marker
        """Present so that ``hasattr(module, "to_quantized")`` holds for quantizable modules."""

    def __repr__(self) -> str:
        return f"Module({self.path!r}, weight.shape={self.weight.shape})"


Predicate = Callable[..., Union[bool, dict[str, int]]]


def _call_predicate(pred: Predicate, path: str, shape: tuple[int, ...], config: dict[str, Any]) -> Any:
    try:
        n = len(inspect.signature(pred).parameters)
    except (TypeError, ValueError):
        n = 2
    if n >= 3:
        return pred(path, _ModuleView(path, shape), config)
    return pred(path, shape)


def make_plan(
    tensors: list[tuple[str, list[int], str]],
    config: ConversionConfig,
    model_config: dict[str, Any],
    bits_override: int | None = None,
) -> tuple[tuple[int, int] | None, dict[str, tuple[int, int]]]:
    """The default ``(bits, group)`` and the quantized modules with theirs.

    Candidates are ``*.weight`` matrices (2-D, or 3-D stacked experts) whose rows split into
    whole groups (mlx-lm's rule for Linear, Embedding and SwitchLinear layers); 1-D tensors
    (norms, biases) always stay float.
    """
    recipe = config.quantization
    group = config.group_size
    mp = dict(DEFAULT_MIXED_PRECISION)
    mp.update(config.mixed_precision_config or {})
    predicate = mp.get("predicate")
    if predicate is not None and not callable(predicate):
        raise ValueError("mixed_precision_config['predicate'] must be callable")
    if recipe is QuantizationRecipe.MIXED_PRECISION:
        default_bits: int | None = int(mp["standard_bits"])
    else:
        default_bits = _RECIPE_BITS.get(recipe)
    if bits_override is not None:
        default_bits = bits_override
    if default_bits is None and predicate is None:
        return None, {}
    modules: dict[str, tuple[int, int]] = {}
    for name, shape, _stored in tensors:
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        module = name[: -len(".weight")]
        chosen: tuple[int, int] | None = None
        if recipe is QuantizationRecipe.MIXED_PRECISION and bits_override is None:
            leaf = module.split(".")[-1]
            if any(c == leaf or c in module.split(".") for c in mp["critical_layers"]):
                chosen = (int(mp["critical_bits"]), group)
            elif _PROJECTIONS.search(module):
                chosen = (int(mp["standard_bits"]), group)
        elif default_bits is not None:
            chosen = (default_bits, group)
        if predicate is not None:
            verdict = _call_predicate(predicate, module, tuple(shape), model_config)
            if isinstance(verdict, dict):
                chosen = (int(verdict.get("bits", default_bits or 4)), int(verdict.get("group_size", group)))
            elif verdict:
                chosen = chosen or (default_bits or 4, group)
            else:
                chosen = None
        if chosen is not None and shape[-1] % chosen[1] == 0:
            modules[module] = chosen
    default = (default_bits, group) if default_bits is not None else next(iter(modules.values()), None)
    return default, modules


# ── Sources and outputs ──────────────────────────────────────────────────────────────────────


def resolve_source(source: str) -> Path:
    """A local path, or a repo id: fetched from the Hugging Face Hub into its cache, or
    found there offline (see :mod:`cortex.hub`)."""
    path = hub.resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {source}")
    return path


def default_output_name(source: str, recipe: QuantizationRecipe) -> str:
    """``org_name`` for repo ids, the folder (or file stem) name for paths, plus ``_<recipe>``."""
    path = Path(source).expanduser()
    if hub.is_repo_id(source):
        base = source.replace("/", "_")
    elif path.is_file():
        base = path.stem
    else:
        base = path.resolve().name
    return f"{base}_{recipe.value}"


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_conversion(
    source: Path,
    out: Path,
    default: tuple[int, int] | None,
    modules: dict[str, tuple[int, int]],
    float_dtype: str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool = True,
    output_format: str = "mlx",
) -> dict[str, Any]:
    """Runs the Rust conversion into the existing directory ``out`` (MLX) or the file ``out``
    (GGUF) with a progress bar; Ctrl-C cancels it (the worker stops at the next tensor) and
    re-raises."""
    job = _core.ConversionJob(
        str(source),
        str(out),
        default=default,
        modules=modules,
        float_dtype=float_dtype,
        max_shard_bytes=max_shard_bytes,
        format=output_format,
    )
    bar = None
    try:
        while not job.wait(0.05):
            done, total = job.progress()
            if show_progress and bar is None and total:
                bar = progress_bar(total, "converting", "tensor")
            if bar is not None:
                bar.update(done - bar.n)
        report: dict[str, Any] = json.loads(job.result())
        if bar is not None:
            bar.update(bar.total - bar.n)
        return report
    except KeyboardInterrupt:
        job.cancel()
        try:
            job.result()  # wait for the worker to stop
        except CortexError:
            pass  # cancelled (or failed meanwhile): the interrupt is what the caller sees
        raise
    finally:
        if bar is not None:
            bar.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # type: ignore[no-any-return]


def validate(output: Path, source: Path | None) -> dict[str, Any]:
    """Loads the converted model and measures it against the source on a fixed text of at
    least 256 tokens: mean KL(source ‖ converted) of next-token distributions and top-1
    agreement. Raises ``CortexError`` for a load failure, a broken tokenizer or NaN logits."""
    converted = _core.load_model(output)
    vocab = int(converted.config["vocab_size"])
    try:
        tokenizer: _core.Tokenizer | None = _core.load_tokenizer(output)
    except ModelNotFoundError:
        tokenizer = None  # weights without tokenizer files
    tokenizer_ok = tokenizer is not None
    if tokenizer is not None:
        ids = tokenizer.encode(_VALIDATION_TEXT)
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if _VALIDATION_TEXT.strip()[:200] not in back:
            raise CortexError("the converted tokenizer does not decode what it encodes")
        ids = ids[:VALIDATION_TOKENS]
    else:
        # Weights without a tokenizer: a fixed pseudo-random token sequence.
        ids = [(i * 7919 + 13) % vocab for i in range(VALIDATION_TOKENS)]
    got = converted.forward(ids, all_positions=True)
    if not np.isfinite(got).all():
        raise CortexError("the converted model produces NaN or infinite logits")
    quality: dict[str, Any] = {"tokens": len(ids), "tokenizer": tokenizer_ok}
    if source is not None:
        try:
            reference = _core.load_model(source).forward(ids, all_positions=True)
        except CortexError as e:
            quality["reference"] = f"source could not be run for comparison: {e}"
            return quality
        p = _log_softmax(reference)
        q = _log_softmax(got)
        kl = (np.exp(p) * (p - q)).sum(axis=-1)
        quality["mean_kl"] = float(kl.mean())
        quality["max_kl"] = float(kl.max())
        quality["top1_agreement"] = float((reference.argmax(-1) == got.argmax(-1)).mean())
    return quality


# ── The converter ────────────────────────────────────────────────────────────────────────────


class MLXConverter:
    """Converts models into the MLX layout (or GGUF) under a cache directory.

    Args:
        cache_dir: where converted models go; default ``~/.cortex/mlx_models``
            (``$CORTEX_HOME/mlx_models``).
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cortex_home() / "mlx_models"
        self.cache_file = self.cache_dir / "conversion_cache.json"

    # The original API: never raises for a failed conversion.
    def convert_model(
        self,
        source_path: str,
        output_name: str | None = None,
        config: ConversionConfig | None = None,
    ) -> tuple[bool, str, Path | None]:
        """Converts ``source_path`` (a local folder or file, or a repo id in the local Hugging
        Face cache) and returns ``(ok, message, output_path)``; failures give
        ``(False, message, None)`` and leave nothing that looks like a finished model."""
        config = config or ConversionConfig()
        name = output_name or default_output_name(str(source_path), config.quantization)
        try:
            if output_name is None and config.cache_converted:
                # An earlier conversion of the same source and settings, under any name.
                key = _cache_key(resolve_source(str(source_path)).resolve(), config, None)
                cached = self._read_cache().get(key)
                if isinstance(cached, dict) and "path" in cached:
                    path = Path(cached["path"])
                    reused = self._check_existing(
                        path, resolve_source(str(source_path)).resolve(), config, None
                    )
                    if reused is not None and reused[0]:
                        return reused
            return self._convert(str(source_path), self.cache_dir / name, config)
        except KeyboardInterrupt:
            raise
        except (CortexError, OSError, ValueError) as e:
            return False, f"Conversion of {source_path} failed: {e}", None

    def _convert(
        self,
        source_path: str,
        output: Path,
        config: ConversionConfig,
        bits_override: int | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        show_progress: bool = True,
    ) -> tuple[bool, str, Path | None]:
        if config.output_format not in ("mlx", "gguf"):
            raise ValueError(f"output_format must be 'mlx' or 'gguf', got {config.output_format!r}")
        if config.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {config.group_size}")
        start = time.monotonic()
        source = resolve_source(source_path)
        src_abs = source.resolve()
        out_abs = output.expanduser().resolve()
        if out_abs == src_abs or src_abs in out_abs.parents or out_abs in src_abs.parents:
            return False, f"output {out_abs} would overwrite or sit inside the source {src_abs}", None
        key = _cache_key(src_abs, config, bits_override)
        _restore_interrupted_swap(out_abs)
        existing = self._check_existing(out_abs, src_abs, config, bits_override)
        if existing is not None:
            return existing
        info = json.loads(_core.inspect_source(source))
        expected = _FORMATS.get(config.source_format)
        if expected is not None and info["format"] not in expected:
            return (
                False,
                (f"source_format is {config.source_format.name} but {source} holds a {info['format']} model"),
                None,
            )
        default, modules = make_plan(
            [(t[0], t[1], t[2]) for t in info["tensors"]],
            config,
            info["config"],
            bits_override,
        )
        out_abs.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_abs)
        tmp = out_abs.with_name(f".{out_abs.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        old = out_abs.with_name(f".{out_abs.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            target = tmp / f"{out_abs.name}.gguf" if config.output_format == "gguf" else tmp
            report = run_conversion(
                source,
                target,
                default,
                modules,
                info["float_dtype"],
                max_shard_bytes,
                show_progress,
                config.output_format,
            )
            quality: dict[str, Any] = {}
            if config.validate_conversion:
                quality = validate(tmp, source)
            bits = sorted({b for b, _ in modules.values()})
            record = {
                "source": str(src_abs),
                "source_format": info["format"],
                "recipe": config.quantization.value,
                "group_size": config.group_size,
                "bits": default[0] if default else None,
                "bits_override": bits_override,
                "bits_used": bits,
                "output_format": config.output_format,
                "use_amx": config.use_amx,
                "compile_model": config.compile_model,
                "bits_per_weight": report["bits_per_weight"],
                "num_parameters": report["num_parameters"],
                "per_tensor": {
                    t["name"]: {
                        "bits": t["bits"],
                        "group_size": t["group_size"],
                        "source": t["source"],
                        "lossless": t["lossless"],
                        "relative_rmse": t["relative_rmse"],
                    }
                    for t in report["tensors"]
                },
                "quality": quality,
                "cortex_version": _core.__version__,
                "duration_s": round(time.monotonic() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
            # Replacing an earlier conversion takes two renames (POSIX cannot swap two
            # folders in one): the earlier one is moved aside first and deleted only once the
            # new one holds the name. Between the renames no folder holds it; an exception
            # there puts the earlier one back below, and a process killed there leaves it
            # as `.NAME.old-PID-X`, which the next conversion restores
            # (`_restore_interrupted_swap`) before it looks at the output.
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
            self._remember(key, out_abs)
        size_mb = _dir_size(out_abs) / 1e6
        quality_text = ""
        if "mean_kl" in quality:
            quality_text = (
                f"; validation over {quality['tokens']} tokens: mean KL {quality['mean_kl']:.4f}, "
                f"top-1 agreement {quality['top1_agreement']:.1%}"
            )
        what = f"{default[0]}-bit, group {default[1]}" if default else "float"
        if config.quantization is QuantizationRecipe.MIXED_PRECISION:
            what = f"mixed {'/'.join(map(str, bits))}-bit, group {config.group_size}"
        message = (
            f"Converted {source_path} to {out_abs} ({what}, "
            f"{report['bits_per_weight']:.2f} bits/weight, {size_mb:.1f} MB) in "
            f"{record['duration_s']:.1f} s{quality_text}"
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


#: Detected source formats each explicit `source_format` accepts (HUGGINGFACE, the default,
#: accepts everything: the format is detected from the files).
_FORMATS = {
    ConversionFormat.GGUF: ("gguf",),
    ConversionFormat.PYTORCH: ("pytorch",),
    ConversionFormat.SAFETENSORS: ("safetensors", "mlx"),
}


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


def quantize_affine(
    w: np.ndarray, bits: int = 4, group_size: int = 64, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX affine quantization of a 2-D float matrix, bit-exact with ``mx.quantize``:
    returns ``(packed uint32 [rows, cols*bits/32], scales, biases [rows, cols/group])``, scales
    and biases in ``dtype`` (bfloat16 as its uint16 bit patterns, since numpy has no bf16)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    packed, scales, biases = _core.affine_quantize(w.tobytes(), rows, cols, bits, group_size, dtype)
    sdt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    groups = cols // group_size
    return (
        np.frombuffer(packed, dtype="<u4").reshape(rows, cols * bits // 32),
        np.frombuffer(scales, dtype=sdt).reshape(rows, groups),
        np.frombuffer(biases, dtype=sdt).reshape(rows, groups),
    )
