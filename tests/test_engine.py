"""The continuous-batching engine on the real SmolLM2 model: batching must not change what
any request generates, the KV cache's blocks always come back, and faults (a full cache,
aborts, Ctrl-C) stay with the requests they concern (RELIABILITY.md E1, E2, E4-E7, G2, G4)."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cortex

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "List three colours:",
    "1, 2, 3,",
    "Write a haiku about the sea. It should mention waves and the moon, and end quietly.",
    "Rust is",
    "What is the boiling point of water at sea level, in degrees Celsius? Answer briefly.",
    "Hello",
]


def _idle(engine: cortex.Engine, timeout: float = 10.0) -> dict[str, float]:
    """Waits until nothing is queued or running, then returns the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["requests_waiting"] + stats["requests_running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


@pytest.fixture(scope="module")
def alone(smollm) -> list[list[int]]:
    """What each prompt generates greedily when it is the only request."""
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=1)
    return [engine.generate_batch([p], max_tokens=24)[0].token_ids for p in PROMPTS]


def test_first_tokens_match_a_forward_pass_without_cache(smollm, alone):
    """Anchor for the engine's outputs outside the engine: greedy's first token is the
    argmax of the model's logits for the prompt."""
    model, tok = smollm
    for prompt, tokens in zip(PROMPTS, alone):
        assert tokens[0] == int(np.argmax(model.forward(tok.encode(prompt))))


def test_a_batch_generates_what_each_prompt_generates_alone(smollm, alone):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=8)
    outs = engine.generate_batch(PROMPTS, max_tokens=24)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert _idle(engine)["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_preemption_with_a_tiny_cache_keeps_outputs_correct(smollm, alone):
    """A cache of 8 blocks of 16 cannot hold 8 requests: requests wait, the newest are
    preempted and recomputed, and every output is still what it is alone."""
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=8, kv_cache_tokens=128, block_size=16)
    outs = engine.generate_batch(PROMPTS, max_tokens=24)
    assert [o.token_ids for o in outs] == alone
    stats = _idle(engine)
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 8


def test_seeded_sampling_is_the_same_at_every_batch_size(smollm):
    model, tok = smollm
    params = [cortex.SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=12) for s in range(16)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    runs = []
    for batch in (1, 4, 16):
        engine = cortex.Engine(model, tok, max_batch_size=batch)
        runs.append([o.token_ids for o in engine.generate_batch(prompts, params)])
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(t) for t in runs[0]}) > 8  # the seeds did produce different texts


def test_100_concurrent_requests_from_threads(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=32)
    counts: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            rid = engine.submit([1 + i, 2 + i, 3 + i], max_tokens=10, ignore_eos=True)
            out = engine.result(rid)
            counts.append(len(out.token_ids) if out.finish_reason == "length" else -1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counts == [10] * 100
    stats = _idle(engine)
    assert stats["requests_finished"] == 100
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_aborting_10_of_100_leaves_the_others_exact(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=64)  # a fresh engine numbers them 0..99
    prompts = [[5 + i, 17, 42] for i in range(100)]
    tokens: dict[int, int] = {}
    finish: dict[int, str] = {}
    for event in engine.stream(prompts, max_tokens=20, ignore_eos=True):
        rid = event.request_id
        if event.token is not None:
            tokens[rid] = tokens.get(rid, 0) + 1
        if event.finish_reason:
            finish[rid] = event.finish_reason
        # Abort every tenth request once it is decoding.
        if rid % 10 == 0 and tokens.get(rid) == 3 and rid not in finish:
            engine.abort(rid)
            engine.abort(rid)  # twice: a no-op
    assert sorted(finish) == list(range(100))
    aborted = list(range(0, 100, 10))
    assert all(finish[r] == "abort" for r in aborted)
    assert all(tokens[r] < 20 for r in aborted)
    others = [r for r in range(100) if r % 10]
    assert all(finish[r] == "length" and tokens[r] == 20 for r in others)
    engine.abort(0)  # after completion: a no-op
    engine.abort(10**9)  # unknown: a no-op
    stats = _idle(engine)
    assert stats["requests_aborted"] == 10
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_abort_of_a_queued_request(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=1)
    first = engine.submit(PROMPTS[0], max_tokens=16, ignore_eos=True)
    queued = engine.submit(PROMPTS[1], max_tokens=16, ignore_eos=True)
    engine.abort(queued)
    assert engine.result(queued).finish_reason == "abort"
    assert engine.result(first).generation_tokens == 16
    stats = _idle(engine)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_request_that_can_never_fit_fails_alone(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, kv_cache_tokens=64, block_size=16)
    ok = engine.submit(PROMPTS[0], max_tokens=4)
    with pytest.raises(cortex.CacheFullError, match="64"):
        engine.submit(list(range(10, 90)), max_tokens=4)
    assert engine.result(ok).generation_tokens == 4
    # A request that fits but outgrows the cache ends with "length" instead of waiting
    # forever for blocks that cannot come.
    out = engine.generate_batch([list(range(10, 50))], max_tokens=100, ignore_eos=True)[0]
    assert out.finish_reason == "length"
    assert 40 + out.generation_tokens == 65  # 64 cached positions plus the newest token


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_the_cache_is_resident_only_as_blocks_are_used(smollm):
    """131072 positions of SmolLM2's f16 cache reserve 2.9 GiB; creating the engine and
    running a short request makes only a few MiB resident (f16 zeros were once written
    element by element, which made the whole reservation resident at once)."""
    model, tok = smollm
    before = _rss_mb()
    engine = cortex.Engine(model, tok, kv_cache_tokens=131072)
    engine.generate_batch([PROMPTS[0]], max_tokens=4)
    assert engine.stats()["kv_blocks_total"] == 8192
    assert _rss_mb() - before < 256


def test_a_prompt_longer_than_the_cache_size_fails_before_any_work(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, kv_cache_size=32)
    with pytest.raises(cortex.ContextLengthError, match="32"):
        engine.submit(list(range(10, 50)), max_tokens=4)
    assert engine.stats()["steps"] == 0


def test_rotating_cache_keeps_generating_past_its_size(smollm):
    model, tok = smollm
    ids = tok.encode(PROMPTS[4])  # 19 tokens
    plain = cortex.Engine(model, tok, kv_cache_size=32)
    rotating = cortex.Engine(model, tok, kv_cache_size=32, rotating_kv_cache=True)
    capped = plain.generate_batch([ids], max_tokens=40, ignore_eos=True)[0]
    assert capped.finish_reason == "length" and len(ids) + capped.generation_tokens == 33
    rolled = rotating.generate_batch([ids], max_tokens=40, ignore_eos=True)[0]
    assert rolled.generation_tokens == 40 and rolled.finish_reason == "length"
    # Until the ring wraps, attention sees the same positions: the same tokens.
    assert rolled.token_ids[: 32 - len(ids)] == capped.token_ids[: 32 - len(ids)]
    # A prompt longer than the ring is fine too.
    assert rotating.generate_batch([ids * 3], max_tokens=4)[0].generation_tokens >= 1
    with pytest.raises(ValueError, match="kv_cache_size"):
        cortex.Engine(model, tok, rotating_kv_cache=True)


def test_stream_interleaves_requests_and_matches_the_batch(smollm, alone):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=4)
    texts: dict[int, str] = {}
    order = []
    for event in engine.stream(PROMPTS[:4], max_tokens=24):
        texts[event.request_id] = texts.get(event.request_id, "") + event.text
        order.append(event.request_id)
    assert len(set(order[:4])) > 1  # tokens of different requests alternate
    # A stream carries no text for the end-of-sequence token that stops a request.
    eos = set(tok.eos_token_ids)
    want = [tok.decode([i for i in t if i not in eos]) for t in alone[:4]]
    assert [texts[i] for i in sorted(texts)] == want


def test_ctrl_c_during_a_batch_aborts_it_and_the_engine_stays_usable(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate_batch(PROMPTS[:3], max_tokens=100_000, ignore_eos=True)
    finally:
        timer.cancel()
    stats = _idle(engine)
    assert stats["requests_aborted"] == 3
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert engine.generate_batch([PROMPTS[0]], max_tokens=3)[0].generation_tokens == 3


def test_bad_requests_fail_alone(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok)
    with pytest.raises(cortex.RequestValidationError, match="out of vocabulary"):
        engine.generate_batch([PROMPTS[0], [1, 10**7]], max_tokens=2)
    with pytest.raises(cortex.RequestValidationError, match="empty"):
        engine.submit([], max_tokens=2)
    with pytest.raises(cortex.RequestValidationError, match="temperature"):
        engine.submit(PROMPTS[0], temperature=-1.0)
    with pytest.raises(ValueError, match="not both"):
        cortex.Engine(model, tok, kv_cache_tokens=64, memory_fraction=0.1)
    # A cache bigger than the machine is refused before anything is allocated.
    with pytest.raises(cortex.RequestValidationError, match="GB"):
        cortex.Engine(model, tok, kv_cache_tokens=10**9)
    assert _idle(engine)["requests_waiting"] == 0
    assert engine.generate_batch([PROMPTS[0]], max_tokens=2)[0].generation_tokens == 2


def test_one_model_from_16_threads(smollm):
    """cortex.generate from many threads shares the model's own engine (RELIABILITY G4):
    no 'Already borrowed', and every thread gets what a lone call gets."""
    model, tok = smollm
    want = cortex.generate(model, tok, PROMPTS[0], max_tokens=8)
    got: list[str] = []
    threads = [
        threading.Thread(target=lambda: got.append(cortex.generate(model, tok, PROMPTS[0], max_tokens=8)))
        for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 16


def test_one_stream_read_from_two_threads(smollm):
    """Two threads pulling from one stream: the second waits for the first with the GIL
    released (holding it would deadlock the first when it comes back)."""
    model, tok = smollm
    stream = cortex._core.stream(
        model, tok, tok.encode(PROMPTS[0]), cortex.SamplingParams(max_tokens=40, ignore_eos=True)
    )
    counts = [0, 0]

    def pull(i: int) -> None:
        for _ in stream:
            counts[i] += 1

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert sum(counts) == 40
