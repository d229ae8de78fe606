"""Ctrl-C during a stream (RELIABILITY.md G2): KeyboardInterrupt arrives promptly, the
worker stops, and the model keeps working."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

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


def _generation_workers() -> int:
    """Live Rust generation threads of this process (Linux: /proc/self/task/*/comm)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().strip() == "cortex-generate"
        except OSError:
            continue
    return count


def _wait_for_no_workers(timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while _generation_workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _generation_workers()


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
    assert _wait_for_no_workers() == 0
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
    # The worker stops at the next prefill chunk rather than finishing the prompt.
    assert _wait_for_no_workers() == 0
    assert cortex.generate(model, tok, PROMPT, max_tokens=2) == cortex.generate(
        model, tok, PROMPT, max_tokens=2
    )


def test_abandoned_stream_stops_its_worker(smollm):
    model, tok = smollm
    stream = cortex.stream_generate(model, tok, PROMPT, max_tokens=100_000, ignore_eos=True)
    next(stream)
    assert _generation_workers() == 1
    stream.close()  # runs the generator's finally: the worker is told to stop
    assert _wait_for_no_workers() == 0
    assert cortex.generate(model, tok, PROMPT, max_tokens=3)
