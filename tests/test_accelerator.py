"""MLXAccelerator and MLXConfig on the real SmolLM2 model: every method does something real
and measurable, and every setting is either applied or reported as not applicable."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
import warnings

import numpy as np
import pytest

import cortex
from cortex import MLXAccelerator, MLXConfig, _core
from cortex.metal.mlx_accelerator import OPTIMIZATION_PRESETS
from cortex.metal.mlx_accelerator import MLXAccelerator as MetalAccelerator

PROMPT = "The capital of France is"


def test_original_import_path_and_defaults():
    assert MetalAccelerator is MLXAccelerator
    c = MLXConfig()
    assert (c.batch_size, c.prefetch_size, c.fusion_threshold, c.memory_fraction) == (8, 2, 1024, 0.85)
    assert (c.dtype, c.rotating_kv_cache, c.kv_cache_size, c.quantization_bits) == ("bfloat16", True, 4096, 4)
    assert c.mixed_precision is False
    assert set(OPTIMIZATION_PRESETS) == {"speed", "memory", "balanced"}
    assert MLXAccelerator.from_preset("memory").config.batch_size == 4
    with pytest.raises(ValueError, match="speed"):
        MLXAccelerator.from_preset("fastest")
    with pytest.raises(ValueError, match="memory_fraction"):
        MLXConfig(memory_fraction=1.5)
    with pytest.raises(ValueError, match="dtype"):
        MLXConfig(dtype="int3")


def test_every_setting_is_applied_or_reported():
    info = MLXAccelerator().get_device_info()
    fields = {f.name for f in dataclasses.fields(MLXConfig)}
    assert set(info["settings"]) == fields
    for name, s in info["settings"].items():
        assert s["reason"], name
    assert info["settings"]["batch_size"]["applied"] and not info["settings"]["compile_model"]["applied"]
    assert info["device"] == "cpu" and info["is_gpu"] is False and info["dtype"] == "float32"
    assert info["memory_total"] > info["memory_available"] > 0
    assert isinstance(info["cpu_features"]["avx2"], bool) and info["cpu_model"]
    assert info["kernels"] in ("amx", "avx512vnni", "avx2", "scalar")
    if info["cpu_features"]["avx512_vnni"] and "CORTEX_KERNEL" not in os.environ:
        assert info["kernels"] == ("amx" if info["amx_available"] else "avx512vnni")
    # AMX needs the CPU to list it (and the OS to grant it, and a trial to pass).
    assert not info["amx_available"] or info["cpu_features"]["amx_int8"]


def test_use_amx_turns_amx_off_and_on():
    """``use_amx`` decides, process-wide, whether products may run on AMX: off, the
    kernels report the AVX-512 level; on, AMX wherever it is available (the 16-core Xeon
    runs this with AMX; a CPU without it reports it unused either way)."""
    try:
        off = MLXAccelerator(MLXConfig(use_amx=False)).get_device_info()
        assert off["amx_in_use"] is False and off["kernels"] != "amx"
        assert off["settings"]["use_amx"]["value"] is False
        q = MLXAccelerator.benchmark_operation("qmatmul", (16, 256, 64), num_iterations=3, use_amx=True)
        assert q["amx_enabled"] is off["amx_available"] and q["amx_requested"] is True
        assert _core.kernel_isa() == off["kernels"]  # the call's setting is undone after it
        on = MLXAccelerator(MLXConfig(use_amx=True)).get_device_info()
        assert on["amx_in_use"] is on["amx_available"] is on["settings"]["use_amx"]["applied"]
    finally:
        _core.allow_amx(True)


def test_generate_optimized_streams_and_honours_settings(smollm):
    model, tok = smollm
    acc = MLXAccelerator(MLXConfig(batch_size=2, kv_cache_size=256))
    greedy = dict(max_tokens=16, temperature=0.0, repetition_penalty=1.0)
    chunks = list(acc.generate_optimized(model, tok, PROMPT, **greedy))
    assert len(chunks) > 1
    whole = list(acc.generate_optimized(model, tok, PROMPT, stream=False, **greedy))
    assert whole == ["".join(chunks)] == [cortex.generate(model, tok, PROMPT, max_tokens=16)]
    # The accelerator's engine follows the config.
    stats = acc.engine(model, tok).stats()
    assert stats["kv_blocks_total"] * stats["kv_block_size"] == 2 * 256


def test_generate_optimized_multi_token_stop_and_messages(smollm):
    model, tok = smollm
    acc = MLXAccelerator()
    greedy = dict(max_tokens=24, temperature=0.0, repetition_penalty=1.0)
    full = next(acc.generate_optimized(model, tok, PROMPT, stream=False, **greedy))
    stop = full[6:14]  # several tokens long
    assert len(tok.encode(stop)) > 1
    cut = next(acc.generate_optimized(model, tok, PROMPT, stream=False, stop_sequences=[stop], **greedy))
    assert cut == full[: full.index(stop)]
    one = next(acc.generate_optimized(model, tok, PROMPT, stream=False, stop_sequences=stop, **greedy))
    assert one == cut  # one string, as the OpenAI client sends it
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = next(acc.generate_optimized(model, tok, messages, stream=False, **greedy))
    want = cortex.generate(model, tok, messages, max_tokens=24)
    assert reply == want


def test_repetition_penalty_changes_the_output(smollm):
    model, tok = smollm
    acc = MLXAccelerator()
    out = {
        p: next(acc.generate_optimized(model, tok, "1, 2, 1, 2, 1, 2,", 16, 0.0, 1.0, p, stream=False))
        for p in (1.0, 1.8)
    }
    assert out[1.0] != out[1.8]


def test_optimize_and_profile_model(smollm):
    model, _ = smollm
    acc = MLXAccelerator()
    assert acc.optimize_model(model, example_input=[1, 2, 3]) is model
    assert acc.last_warmup_seconds > 0
    prof = acc.profile_model(model, input_shape=(2, 16), num_iterations=3)
    assert prof["num_parameters"] == model.num_parameters and prof["batch_size"] == 2
    assert prof["device"] == "cpu" and prof["dtype"]
    # Against a loop timed here: the same work, within a factor of 2.
    seqs = [[5] * 16, [6] * 16]
    start = time.perf_counter()
    for _ in range(3):
        model.forward_batch(seqs)
    by_hand = (time.perf_counter() - start) / 3
    assert by_hand / 2 < prof["avg_inference_time"] < by_hand * 2
    # The original's throughput is samples (sequences) per second; tokens under their own key.
    assert prof["throughput"] == pytest.approx(2 / prof["avg_inference_time"])
    assert prof["tokens_per_second"] == pytest.approx(32 / prof["avg_inference_time"])


def test_benchmark_operation_counts_true_flops():
    acc = MLXAccelerator()
    r = acc.benchmark_operation("matmul", (16, 64, 32), num_iterations=20)
    assert r["flops"] == 2 * 16 * 64 * 32
    assert r["gflops"] == pytest.approx(r["flops"] / r["avg_time"] / 1e9)
    q = acc.benchmark_operation("qmatmul", (4, 256, 128), num_iterations=20)
    assert q["flops"] == 2 * 4 * 256 * 128 and q["gflops"] > 0
    # Weights read: 4-bit codes plus an f16 scale and bias per group of 32.
    assert q["bytes"] == 128 * 256 // 2 + 128 * (256 // 32) * 4
    assert q["gbytes_per_s"] == pytest.approx(q["bytes"] / q["avg_time"] / 1e9)
    q8 = acc.benchmark_operation("qmatmul", (1, 256, 128, 8, 64), num_iterations=20)
    assert q8["bytes"] == 128 * 256 + 128 * (256 // 64) * 4
    bw = acc.benchmark_operation("bandwidth", (64,), num_iterations=2)
    assert bw["bytes"] == 64 << 20 and bw["gbytes_per_s"] > 0 and bw["gflops"] is None
    a = acc.benchmark_operation("attention", (32, 4, 16), num_iterations=5)
    assert a["flops"] == 2 * 4 * 16 * 32 * 33
    assert a["use_amx"] is False and a["amx_requested"] is True
    x = np.ones((32, 32), dtype=np.float32)
    c = acc.benchmark_operation(lambda: x @ x, (32, 32), num_iterations=10, flops=2 * 32**3)
    assert c["gflops"] > 0 and c["operation"] == "<lambda>"
    with pytest.raises(ValueError, match="operation"):
        acc.benchmark_operation("conv", (1, 1))
    with pytest.raises(ValueError, match="groups of 32"):
        acc.benchmark_operation("qmatmul", (4, 40, 8))
    with pytest.raises(ValueError, match="bits"):
        acc.benchmark_operation("qmatmul", (4, 64, 8, 7, 32))


def test_benchmark_operation_on_the_class_with_an_array_callable():
    """The original's form: called on the class, with a callable of one array built from
    ``input_shape``; its keys (``throughput_gflops`` ...) and the original's FLOP count."""
    seen: list[np.ndarray] = []

    def matmul_op(x):
        seen.append(x)
        return np.matmul(x, x.T)

    r = MLXAccelerator.benchmark_operation(matmul_op, input_shape=(64, 64), num_iterations=50, use_amx=True)
    assert (seen[0].shape, seen[0].dtype) == ((64, 64), np.dtype(np.float32))
    assert len(seen) == 10 + 50  # the original's 10 warm-up calls, then the timed ones
    assert all(x is seen[0] for x in seen)  # one input, built before timing
    assert r["flops"] == 2 * 64**3 and r["flops_assumed"] is True and r["input_framework"] == "numpy"
    assert r["throughput_gflops"] == r["gflops"] == pytest.approx(2 * 64**3 / r["avg_time"] / 1e9)
    assert r["avg_time_ms"] == pytest.approx(r["avg_time"] * 1e3)
    assert r["amx_enabled"] is False and r["amx_requested"] is True

    # A lazy result (as mlx returns) is materialised inside the timed loop.
    class Lazy:
        forced = 0

        def __array__(self, dtype=None, copy=None):
            Lazy.forced += 1
            return np.zeros(1)

    MLXAccelerator.benchmark_operation(lambda x: Lazy(), input_shape=(4, 4), num_iterations=3)
    assert Lazy.forced == 10 + 3
    # Engine operations work on the class too.
    assert (
        MLXAccelerator.benchmark_operation("matmul", (4, 32, 8), num_iterations=2)["flops"] == 2 * 4 * 32 * 8
    )


def test_benchmark_flop_counts_given_assumed_or_unknown():
    """``flops_assumed`` says when the count is the default matmul formula; without any
    count ``throughput_gflops`` is 0.0 (as the original's), so user f-strings format it."""
    x = np.ones((16, 16), dtype=np.float32)
    given = MLXAccelerator.benchmark_operation(lambda a: a @ a, (16, 16), num_iterations=5, flops=2 * 16**3)
    assert given["flops_assumed"] is False and given["throughput_gflops"] > 0
    unknown = MLXAccelerator.benchmark_operation(lambda: x @ x, (16, 16), num_iterations=5)
    assert unknown["flops"] is None and unknown["gflops"] is None and unknown["flops_assumed"] is False
    assert unknown["throughput_gflops"] == 0.0 and f"{unknown['throughput_gflops']:.1f}" == "0.0"
    assert unknown["input_framework"] is None
    bw = MLXAccelerator.benchmark_operation("bandwidth", (8,), num_iterations=2)
    assert bw["throughput_gflops"] == 0.0 and bw["flops_assumed"] is False
    engine = MLXAccelerator.benchmark_operation("matmul", (4, 32, 8), num_iterations=2)
    assert engine["flops_assumed"] is False and engine["throughput_gflops"] == engine["gflops"]


class _FakeMlxArray:
    """Enough of an mlx array for a matmul callable: records how it is used."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    @property
    def T(self) -> _FakeMlxArray:
        return _FakeMlxArray(self.value.T)

    def __matmul__(self, other: _FakeMlxArray) -> _FakeMlxArray:
        return _FakeMlxArray(self.value @ other.value)


def test_benchmark_callable_input_in_mlx_when_mlx_is_imported(monkeypatch):
    """With mlx imported, a callable that names no framework gets an mlx array, made once
    with ``mx.random.normal`` and evaluated before timing; every result goes through
    ``mx.eval`` (lazy work is timed)."""
    made: list[tuple[int, ...]] = []
    evaluated: list[object] = []

    def normal(shape):
        made.append(tuple(shape))
        return _FakeMlxArray(np.random.default_rng(1).standard_normal(shape, dtype=np.float32))

    mx = types.ModuleType("mlx.core")
    mx.random = types.SimpleNamespace(normal=normal)  # type: ignore[attr-defined]
    mx.eval = lambda *arrays: evaluated.extend(arrays)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlx.core", mx)
    seen: list[object] = []

    def op(x):
        seen.append(x)
        return x @ x.T

    r = MLXAccelerator.benchmark_operation(op, input_shape=(8, 8), num_iterations=7)
    assert made == [(8, 8)] and r["input_framework"] == "mlx"
    assert len(seen) == 17 and all(x is seen[0] for x in seen) and isinstance(seen[0], _FakeMlxArray)
    assert evaluated[0] is seen[0] and len(evaluated) == 1 + 17  # the input, then each result
    assert all(isinstance(e, _FakeMlxArray) and e.value.shape == (8, 8) for e in evaluated)
    # A numpy function stays on numpy even with mlx imported.
    r = MLXAccelerator.benchmark_operation(np.sort, input_shape=(8, 8), num_iterations=2)
    assert r["input_framework"] == "numpy" and made == [(8, 8)]


def test_benchmark_torch_callable_gets_a_tensor(monkeypatch):
    """A torch function gets a tensor from ``torch.from_numpy`` (torch functions do not
    take numpy arrays), made once before timing."""
    converted: list[np.ndarray] = []

    class Tensor:
        def __init__(self, value: np.ndarray) -> None:
            self.value = value

    def from_numpy(a: np.ndarray) -> Tensor:
        converted.append(a)
        return Tensor(a)

    def matmul(a: Tensor, b: Tensor) -> Tensor:
        if not isinstance(a, Tensor):
            raise TypeError("matmul(): argument 'input' must be Tensor, not numpy.ndarray")
        return Tensor(a.value @ b.value)

    torch = types.ModuleType("torch")
    torch.from_numpy = from_numpy  # type: ignore[attr-defined]
    torch.matmul = matmul  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    op = eval("lambda x: torch.matmul(x, x)", {"torch": torch})  # as user code refers to torch
    r = MLXAccelerator.benchmark_operation(op, input_shape=(8, 8), num_iterations=4)
    assert r["input_framework"] == "torch" and len(converted) == 1
    assert converted[0].shape == (8, 8) and converted[0].dtype == np.float32


def test_get_device_info_on_the_class():
    info = MLXAccelerator.get_device_info()
    assert info["is_gpu"] is False and info["device"] == "cpu"
    assert info["default_dtype"] == "float32"  # the original's key
    assert info["config"] == dataclasses.asdict(MLXConfig())
    own = MLXAccelerator(MLXConfig(batch_size=3)).get_device_info()
    assert own["settings"]["batch_size"]["value"] == 3

    class Mine(MLXAccelerator):
        def __init__(self, name: str) -> None:  # a constructor that needs an argument
            super().__init__()
            self.name = name

    assert Mine.get_device_info()["config"] == dataclasses.asdict(MLXConfig())
    assert Mine("x").get_device_info()["device"] == "cpu"


def test_reports_exist_before_the_first_call():
    acc = MLXAccelerator()
    assert acc.last_memory_report is None and acc.last_warmup_seconds is None


def test_config_takes_dtype_objects():
    """``dtype=mx.bfloat16`` as the guide writes it: mlx dtypes print as
    ``mlx.core.bfloat16``; numpy's dtypes work too. All are stored by name."""
    try:
        import mlx.core as mx

        mlx_bf16: object = mx.bfloat16
    except ImportError:

        class MlxDtype:  # what mlx's Dtype looks like to Cortex: its printed name
            def __repr__(self) -> str:
                return "mlx.core.bfloat16"

        mlx_bf16 = MlxDtype()
    assert MLXConfig(dtype=mlx_bf16).dtype == "bfloat16"
    assert MLXConfig(dtype=np.float16).dtype == "float16"
    assert MLXConfig(dtype=np.dtype("float32")).dtype == "float32"
    assert MLXConfig(dtype="bfloat16").dtype == "bfloat16"
    later = MLXConfig()
    later.dtype = np.float16  # assigned after construction: stored by name too
    assert later.dtype == "float16" and dataclasses.asdict(later)["dtype"] == "float16"
    with pytest.raises(ValueError, match="dtype"):
        later.dtype = "int4"
    with pytest.raises(ValueError, match="dtype"):
        MLXConfig(dtype=np.int8)
    with pytest.raises(ValueError, match="dtype"):
        MLXConfig(dtype=None)


def test_model_quantized(smollm, tmp_path):
    """``Model.quantized`` comes from the decoder: what picks the KV cache's dtype."""
    from hf_models import write_tiny_hf

    model, _ = smollm
    assert model.quantized is True and model.kv_dtype == "float16"
    plain = model.dequantize()
    assert plain.quantized is False and plain.kv_dtype == "float32"
    write_tiny_hf(tmp_path / "tiny", shards=1)
    tiny = cortex.load_model(tmp_path / "tiny")
    assert tiny.quantized is False and tiny.requantize(8).quantized is True


def test_optimize_memory(smollm, tmp_path):
    """A float model is packed to config.quantization_bits; a quantized one is kept."""
    from hf_models import write_tiny_hf

    model, _ = smollm
    acc = MLXAccelerator(MLXConfig(quantization_bits=4))
    assert acc.optimize_memory(model) is model
    assert acc.last_memory_report["weight_bytes_after"] == model.weight_bytes
    write_tiny_hf(tmp_path / "tiny", shards=1)
    tiny = cortex.load_model(tmp_path / "tiny")
    small = acc.optimize_memory(tiny)
    report = acc.last_memory_report
    assert small is not tiny and report["weight_bytes_before"] == tiny.weight_bytes
    assert report["weight_bytes_after"] == small.weight_bytes < tiny.weight_bytes / 2
    ids = [1, 2, 3, 4]
    assert np.argmax(small.forward(ids)) == np.argmax(tiny.forward(ids))


def test_quantize_model_packs_real_weights(smollm):
    """Requantization is real: the copy's weights change size with the bits, its logits
    stay close to the original's, and the original model is untouched. SmolLM2's Q4_1
    layers and Q8_0 head repack exactly at 4 and 8 bits (mixed: mean KL 0.006, which is
    candle's 8-bit rounding of activations in the original's Q4_1 matmul); all at 8 bits
    rounds a second time (0.010)."""
    from numpy_reference import mean_kl

    model, tok = smollm
    acc = MLXAccelerator()
    ids = tok.encode("The capital of France is Paris, and the capital of Spain is")
    want = model.forward(ids, all_positions=True)
    q8 = acc.quantize_model(model, bits=8)
    q4 = acc.quantize_model(model)  # config.quantization_bits = 4
    q4m = acc.quantize_model(model, bits=4, mixed_precision=True)
    assert q4.weight_bytes < q4m.weight_bytes < q8.weight_bytes
    assert mean_kl(want, q4m.forward(ids, all_positions=True)) < 0.01
    assert mean_kl(want, q8.forward(ids, all_positions=True)) < 0.02
    assert np.isfinite(q4.forward(ids)).all()
    np.testing.assert_array_equal(model.forward(ids, all_positions=True), want)
    assert cortex.generate(q8, tok, PROMPT, max_tokens=4)
    with pytest.raises(ValueError, match="bits"):
        acc.quantize_model(model, bits=7)


def test_pipeline_chains_models(smollm):
    model, tok = smollm
    acc = MLXAccelerator()
    pipe = acc.create_pipeline([(model, tok), (model, tok)], batch_size=2)
    prompts = [PROMPT, "Once upon a time"]
    out = pipe(prompts, max_tokens=6)
    first = [cortex.generate(model, tok, p, max_tokens=6) for p in prompts]
    assert out == [cortex.generate(model, tok, f, max_tokens=6) for f in first]
    assert all(e.stats()["requests_finished"] == 2 for e in pipe.engines)
    with pytest.raises(ValueError, match="at least one"):
        acc.create_pipeline([])


def test_pipeline_of_plain_models(smollm, tmp_path):
    """The guide's ``create_pipeline([model1, model2, model3], batch_size=4)``: each
    model's tokenizer is found beside it; one prompt in, one text out."""
    from hf_models import write_tiny_hf

    model, tok = smollm
    plain = cortex.load_model(model.path)
    pipe = MLXAccelerator().create_pipeline([plain, model], batch_size=4)
    first = cortex.generate(model, tok, PROMPT, max_tokens=5)
    assert pipe(PROMPT, max_tokens=5) == cortex.generate(model, tok, first, max_tokens=5)
    write_tiny_hf(tmp_path / "bare", shards=1)  # no tokenizer files
    with pytest.raises(cortex.TokenizerError, match="stage 1 has no tokenizer"):
        MLXAccelerator().create_pipeline([model, cortex.load_model(tmp_path / "bare")])
    with pytest.raises(TypeError, match="stage 0 is a str"):
        MLXAccelerator().create_pipeline(["model.gguf"])


def test_accelerate_transformer(smollm):
    model, tok = smollm
    acc = MLXAccelerator()
    with pytest.warns(cortex.CortexWarning, match=r"num_heads=12, but this model has num_heads=9"):
        assert acc.accelerate_transformer(model, num_heads=12, head_dim=64) is model
    # The older call form, a tokenizer where num_heads goes: a TypeError with the fix.
    with pytest.raises(TypeError, match=r"num_heads must be an int, got Tokenizer.*tokenizer=tok"):
        acc.accelerate_transformer(model, tok)
    with pytest.raises(TypeError, match="head_dim must be an int, got str"):
        acc.accelerate_transformer(model, 9, "64")
    with pytest.raises(TypeError, match="num_heads must be an int, got bool"):
        acc.accelerate_transformer(model, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc.accelerate_transformer(model, np.int64(9), 64)  # numpy ints are ints
    fast = acc.accelerate_transformer(model, num_heads=9, head_dim=64, tokenizer=tok, bits=4)
    assert fast is not model and acc.last_warmup_seconds > 0
    assert acc.engine(fast, tok).stats()["steps"] == 0  # started, idle
    assert next(acc.generate_optimized(fast, tok, PROMPT, max_tokens=4, temperature=0.0, stream=False))


def test_profile_times_every_operation_of_a_cpu_pass(smollm):
    """``_core.profile``: with profiling on, a forward pass charges each of its operations
    (one attention, RoPE and cache write per layer; q/k/v, o, gate/up and down per layer,
    then the head); off, nothing is recorded."""
    model, _ = smollm
    n = model.config["num_hidden_layers"]
    _core.profile(reset=True, enable=True)
    try:
        model.forward(list(range(10, 42)))
        rows = {op: (calls, seconds) for op, calls, seconds in _core.profile(reset=True)}
    finally:
        _core.profile(reset=True, enable=False)
    assert rows["attention"][0] == rows["rope"][0] == rows["kv store"][0] == n
    assert rows["linear"][0] == 4 * n + 1
    assert rows["embedding"][0] == 1 and rows["norm"][0] >= 2 * n
    assert all(seconds > 0 for _, seconds in rows.values())
    model.forward([1, 2, 3])
    assert _core.profile() == []
