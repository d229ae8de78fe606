"""Environment variables of the tools Cortex's users come from: honoured where they mean
something here, otherwise named in a one-time warning, never silently ignored."""

from __future__ import annotations

import time
import warnings

import pytest

import cortex
from cortex import _env


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_env, "_warned", set())


def _settle(stats, want: tuple[int, int]) -> tuple[int, int]:
    """(running, waiting) once it equals ``want``, or as it is after 30 s. Submitted
    requests reach the scheduler's queues at its next step, so the counts settle over a
    step or two; long requests (1000 tokens) keep them there while this looks."""
    deadline = time.monotonic() + 30
    while True:
        s = stats()
        got = (s["requests_running"], s["requests_waiting"])
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.005)


def test_candle_num_parallel_sets_the_engines_batch(smollm, monkeypatch):
    """``CANDLE_NUM_PARALLEL=2``: an engine runs two requests at once and queues the third
    (the default, 32, would run all three)."""
    model, tok = smollm
    monkeypatch.setenv("CANDLE_NUM_PARALLEL", "2")
    engine = cortex.Engine(model, tok, kv_cache_tokens=1024)
    events = engine.stream(["a", "b", "c"], max_tokens=1000, ignore_eos=True)
    next(events)
    assert _settle(engine.stats, (2, 1)) == (2, 1)
    events.close()
    monkeypatch.delenv("CANDLE_NUM_PARALLEL")
    engine = cortex.Engine(model, tok, kv_cache_tokens=1024)
    events = engine.stream(["a", "b", "c"], max_tokens=48, ignore_eos=True)
    next(events)
    deadline = time.monotonic() + 30
    while engine.stats()["requests_running"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the three prompts may be admitted over a step or two
    assert engine.stats()["requests_running"] == 3
    events.close()
    # An explicit max_batch_size wins.
    monkeypatch.setenv("CANDLE_NUM_PARALLEL", "not a number")
    cortex.Engine(model, tok, max_batch_size=4, kv_cache_tokens=64)


def test_candle_num_parallel_reaches_the_models_own_engine(model_path, monkeypatch):
    """The engine ``cortex.generate``/``stream_generate`` run on (one per model, started on
    first use) takes its batch size from ``CANDLE_NUM_PARALLEL`` too."""
    from cortex import _core

    monkeypatch.setenv("CANDLE_NUM_PARALLEL", "2")
    model, tok = cortex.load(model_path)  # a fresh model: its engine starts here
    params = cortex.SamplingParams(max_tokens=1000, ignore_eos=True)
    streams = [_core.stream(model, tok, tok.encode(p), params) for p in ("a", "b", "c")]
    try:
        assert _settle(lambda: _core.engine_stats(model), (2, 1)) == (2, 1)
    finally:
        for s in streams:
            s.cancel()
    monkeypatch.setenv("CANDLE_NUM_PARALLEL", "two")
    fresh = cortex.load_model(model_path)
    with pytest.raises(cortex.ConfigError, match="CANDLE_NUM_PARALLEL") as err:
        cortex.generate(fresh, tok, "a", max_tokens=2)
    assert err.value.field == "CANDLE_NUM_PARALLEL"


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_candle_num_parallel_must_be_a_count(smollm, monkeypatch, value):
    model, tok = smollm
    monkeypatch.setenv("CANDLE_NUM_PARALLEL", value)
    with pytest.raises(cortex.ConfigError, match="CANDLE_NUM_PARALLEL") as err:
        cortex.Engine(model, tok, kv_cache_tokens=64)
    assert err.value.field == "CANDLE_NUM_PARALLEL"


def test_candle_force_f32_on_a_quantized_model_warns_once(model_path, monkeypatch, fresh_warnings):
    monkeypatch.setenv("CANDLE_FORCE_F32", "1")
    with pytest.warns(cortex.CortexWarning, match="CANDLE_FORCE_F32 is set.*quantized.*dequantize") as rec:
        cortex.load_model(model_path)
    assert rec[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cortex.load_model(model_path)  # once per process


def test_candle_force_f32_on_a_float_model_is_already_true(tmp_path, monkeypatch, fresh_warnings):
    from hf_models import write_tiny_hf

    write_tiny_hf(tmp_path / "tiny", shards=1)
    monkeypatch.setenv("CANDLE_FORCE_F32", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = cortex.load_model(tmp_path / "tiny")
    assert model.dtype == "float32" and model.weight_bytes == 4 * model.num_parameters


def test_unset_or_off_says_nothing(model_path, monkeypatch, fresh_warnings):
    monkeypatch.setenv("CANDLE_FORCE_F32", "0")
    monkeypatch.delenv("CANDLE_NUM_PARALLEL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cortex.load_model(model_path)
