"""The original project's MLX Acceleration Guide (its docs/mlx-acceleration.md), run top to
bottom as written from examples/mlx_guide.py, with a check on what each call returns."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cortex
from cortex import ConversionConfig, CortexWarning, MLXAccelerator, MLXConfig, QuantizationRecipe

GUIDE = Path(__file__).parents[1] / "examples" / "mlx_guide.py"

Check = Callable[[dict[str, Any], str], None]


def cells() -> list[tuple[str, str]]:
    """``(title, code)`` of each ``# %%`` code cell of the example, in order; the code is
    padded with blank lines so that tracebacks give the example's own line numbers."""
    lines = GUIDE.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("# %%")]
    out = []
    for start, end in zip(starts, [*starts[1:], len(lines)]):
        title = lines[start][len("# %%") :].strip()
        if not title.startswith("[markdown]"):
            out.append((title, "\n" * start + "".join(lines[start:end])))
    return out


def _converted(ns: dict[str, Any], out: str) -> None:
    assert ns["success"] is True, ns["message"]
    assert Path(ns["output_path"]).parent == Path(ns["converter"].cache_dir)
    config = json.loads((Path(ns["output_path"]) / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (4, 64)
    assert f"{ns['success']} {ns['message']}" in out


def _mixed(ns: dict[str, Any], out: str) -> None:
    assert ns["config"].quantization is QuantizationRecipe.MIXED_PRECISION
    assert ns["config"].mixed_precision_config == ns["mixed_config"]


def _chip(ns: dict[str, Any], out: str) -> None:
    config = json.loads((Path(ns["output_path"]) / "config.json").read_text())
    assert config["chip_optimization"]["chip"] == "m3_pro"


def _setup(ns: dict[str, Any], out: str) -> None:
    assert isinstance(ns["model"], cortex.Model) and isinstance(ns["tokenizer"], cortex.Tokenizer)


def _accelerator(ns: dict[str, Any], out: str) -> None:
    acc = ns["accelerator"]
    assert acc.config.dtype == "bfloat16" and acc.config.kv_cache_size == 4096
    assert ns["optimized_model"] is ns["model"] and acc.last_warmup_seconds > 0


def _presets(ns: dict[str, Any], out: str) -> None:
    want = MLXConfig(**MLXAccelerator.OPTIMIZATION_PRESETS["speed"])
    assert ns["accelerator"].config == want


def _transformer(ns: dict[str, Any], out: str) -> None:
    assert ns["optimized_model"] is ns["model"]


def _profile(ns: dict[str, Any], out: str) -> None:
    p = ns["profile"]
    assert (p["batch_size"], p["seq_len"], p["num_iterations"]) == (1, 512, 100)
    assert p["throughput"] == pytest.approx(1 / p["avg_inference_time"])  # samples/s
    assert p["tokens_per_second"] == pytest.approx(512 / p["avg_inference_time"])
    assert p["num_parameters"] == ns["model"].num_parameters
    assert f"Throughput: {p['throughput']:.1f} samples/s" in out
    assert f"Parameters: {p['num_parameters']:,}" in out


def _operation(ns: dict[str, Any], out: str) -> None:
    r = ns["results"]
    assert r["num_iterations"] == 1000 and r["operation"] == "matmul_op"
    assert r["throughput_gflops"] == pytest.approx(2 * 1024**3 / r["avg_time"] / 1e9)
    assert r["throughput_gflops"] > 0.1 and r["avg_time_ms"] == pytest.approx(r["avg_time"] * 1e3)
    assert r["amx_enabled"] is False and r["amx_requested"] is True
    assert f"GFLOPS: {r['throughput_gflops']:.1f}" in out


def _memory_config(ns: dict[str, Any], out: str) -> None:
    assert (ns["config"].memory_fraction, ns["config"].fusion_threshold) == (0.85, 1024)


def _optimize_memory(ns: dict[str, Any], out: str) -> None:
    # The converted model is 4-bit already: kept as it is.
    assert ns["optimized_model"] is ns["model"]
    report = ns["accelerator"].last_memory_report
    assert report["weight_bytes_after"] == report["weight_bytes_before"] == ns["model"].weight_bytes


def _device(ns: dict[str, Any], out: str) -> None:
    info = ns["info"]
    assert info["is_gpu"] is False and info["device"] == "cpu"
    assert "Is GPU: False" in out


def _monitor(ns: dict[str, Any], out: str) -> None:
    assert isinstance(ns["token"], str) and len(out.strip()) > 0


def _reduced(ns: dict[str, Any], out: str) -> None:
    assert ns["config"].memory_fraction == 0.7


def _predicate(ns: dict[str, Any], out: str) -> None:
    config: ConversionConfig = ns["config"]
    pred = config.mixed_precision_config["predicate"]
    assert pred("model.layers.0.self_attention.q_proj", None, {}) == {"bits": 6, "group_size": 64}
    assert pred("model.embed_tokens", None, {}) is False


def _stages(ns: dict[str, Any], out: str) -> None:
    assert all(isinstance(ns[f"model{i}"], cortex.Model) for i in (1, 2, 3))


def _pipeline(ns: dict[str, Any], out: str) -> None:
    output = ns["output"]
    assert isinstance(output, list) and len(output) == 4 and all(isinstance(t, str) for t in output)
    engines = ns["pipeline"].engines
    assert len(engines) == 3
    # Every stage takes the texts the one before it gave, except empty ones (a model that
    # ended at once: nothing to continue; that prompt's result is "").
    finished = [e.stats()["requests_finished"] for e in engines]
    assert finished[0] == 4 and finished == sorted(finished, reverse=True), finished
    assert sum(1 for t in output if t) <= finished[-1]


def _streams(ns: dict[str, Any], out: str) -> None:
    assert ns["config"].stream_parallel is True and ns["config"].prefetch_size == 2


#: The guide's 16 code blocks (in its order) and the example's set-up cells, by the
#: start of their cell titles.
CHECKS: dict[str, Check | None] = {
    "The guide's `import mlx.core as mx`": None,
    "Model Conversion: Converting HuggingFace Models": _converted,
    "Mixed Precision Configuration": _mixed,
    "Chip-Specific Optimization": _chip,
    "The guide's `model`, `tokenizer` and `prompt`": _setup,
    "Performance Optimization: MLX Accelerator Configuration": _accelerator,
    "Optimization Presets": _presets,
    "Transformer-Specific Optimizations": _transformer,
    "Benchmarking: Performance Profiling": _profile,
    "Operation Benchmarking": _operation,
    "Memory Management: Optimized Memory Allocation": _memory_config,
    "Memory Optimization for Large Models": _optimize_memory,
    "Debugging and Monitoring: Check MLX Device": _device,
    "Monitor Performance": _monitor,
    "Troubleshooting: Memory errors with large models": _reduced,
    "Advanced Topics: Custom Quantization Predicates": _predicate,
    "The guide's `model1`..`model3` and `input_data`": _stages,
    "Pipeline Creation": _pipeline,
    "Stream Parallelism": _streams,
}


def test_the_example_has_every_block_of_the_guide() -> None:
    titles = [t for t, _ in cells()]
    assert len(titles) == len(CHECKS)
    for title, start in zip(titles, CHECKS):
        assert title.startswith(start), (title, start)
    assert sum(not t.startswith("The guide's") for t in titles) == 16


@pytest.mark.timeout(1800)
def test_the_guide_runs_as_written(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slow by the guide's own numbers: 100 profiled passes over 512 tokens and 1000
    products of 1024x1024 matrices."""
    # The converter's cache ($CORTEX_HOME/mlx_models) starts empty; the model stays put.
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path))
    monkeypatch.setattr(cortex, "default_model_path", lambda *args, **kwargs: model_path)
    ns: dict[str, Any] = {"__name__": "__guide__"}
    for (title, code), check in zip(cells(), CHECKS.values()):
        compiled = compile(code, str(GUIDE), "exec")
        if title.startswith("Transformer-Specific"):
            # num_heads=12, head_dim=64 describe DialoGPT: said, not silently dropped.
            with pytest.warns(CortexWarning, match=r"num_heads=12, but this model has num_heads=9"):
                exec(compiled, ns)
        else:
            exec(compiled, ns)
        out = capsys.readouterr().out
        if check is not None:
            check(ns, out)
    assert ns["converter"].cache_dir == tmp_path / "mlx_models"
