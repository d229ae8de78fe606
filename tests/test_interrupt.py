"""Ctrl-C during a stream (RELIABILITY.md G2): KeyboardInterrupt arrives promptly, the
request is aborted in the engine, and the model keeps working."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

import cortex

PROMPT = "The capital of France is"


def _interrupt_after(seconds: float, fired: list[float] | None = None) -> threading.Timer:
    def fire() -> None:
        if fired is not None:
            fired.append(time.monotonic())
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer


def _in_flight(model: cortex.Model) -> int:
    """Requests queued or running on the model's own engine."""
    stats = cortex._core.engine_stats(model)
    return int(stats["requests_waiting"] + stats["requests_running"])


def _wait_until_idle(model: cortex.Model, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while _in_flight(model) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _in_flight(model)


def test_ctrl_c_interrupts_a_long_stream(smollm):
    model, tok = smollm
    expected = cortex.generate(model, tok, PROMPT, max_tokens=8)
    received = 0
    fired: list[float] = []
    timer = _interrupt_after(1.0, fired)
    try:
        for _ in cortex.stream_generate(model, tok, PROMPT, max_tokens=100_000, ignore_eos=True):
            received += 1
        raise AssertionError("the stream was not interrupted")
    except KeyboardInterrupt:
        latency = time.monotonic() - fired[0]
    finally:
        timer.cancel()
    assert received > 0
    # Responsiveness bound, not a speed measurement: one decode step on this model takes
    # tens of milliseconds; the stream polls for signals every 50 ms.
    assert latency < 1.0
    assert _wait_until_idle(model) == 0
    # The model is still usable, and still correct.
    assert cortex.generate(model, tok, PROMPT, max_tokens=8) == expected


def test_ctrl_c_during_a_long_prefill(smollm):
    model, tok = smollm
    long_prompt = [504, 2365, 6354, 16438] * 400  # 1,600 tokens: seconds of prefill
    timer = _interrupt_after(0.3)
    start = time.monotonic()
    try:
        for _ in cortex.stream_generate(model, tok, long_prompt, max_tokens=4):
            pass
        raise AssertionError("the prefill was not interrupted")
    except KeyboardInterrupt:
        elapsed = time.monotonic() - start
    finally:
        timer.cancel()
    assert elapsed < 3.0  # far less than the whole prefill would take on this machine
    # The engine drops the request after the step in progress rather than finishing it.
    assert _wait_until_idle(model) == 0
    assert cortex.generate(model, tok, PROMPT, max_tokens=2) == cortex.generate(
        model, tok, PROMPT, max_tokens=2
    )


def test_abandoned_stream_stops_its_request(smollm):
    model, tok = smollm
    stream = cortex.stream_generate(model, tok, PROMPT, max_tokens=100_000, ignore_eos=True)
    next(stream)
    assert _in_flight(model) == 1
    stream.close()  # runs the generator's finally: the request is aborted
    assert _wait_until_idle(model) == 0
    assert cortex.generate(model, tok, PROMPT, max_tokens=3)


def test_loading_reports_layers_and_stops_when_cancelled(model_path):
    """Loading reports its layers to a progress object (what the progress bar draws) and a
    cancelled load (what Ctrl-C during cortex.load does) stops with CancelledError."""
    progress = cortex._core.Progress()
    model = cortex._core.load_model(str(model_path), progress)
    layers = model.config["num_hidden_layers"]
    assert progress.get() == (layers, layers)
    stopped = cortex._core.Progress()
    stopped.cancel()
    with pytest.raises(cortex.CancelledError):
        cortex._core.load_model(str(model_path), stopped)
    assert stopped.get()[0] == 0
    # Errors on the loading thread reach the caller with their own type.
    with pytest.raises(cortex.ModelNotFoundError):
        cortex.load_model("/nonexistent/model.gguf")
