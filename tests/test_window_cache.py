"""Sliding-window layers that keep only their window (``sliding_window_eviction``, on by
default): Gemma 3's local layers give back the blocks their window has left. What the
engine generates matches the independent numpy reference (which keeps every position and
masks) and an engine that keeps every position, through chunked prefill, batching,
preemption, prefix caching, speculation and saved prefixes; the window layers' blocks are
bounded and all come back. The tiny Gemma has six local layers of seven and a window of 3,
so blocks of 2 leave the window within a few positions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hf_models import GEMMA_WINDOW, family, write_tiny_hf
from numpy_reference import forward
from test_engine import _idle

import cortex

BLOCK = 2
#: Window layers' blocks of an engine of at most 2 sequences and 8 tokens a step: each holds
#: the blocks of its last window - 1 positions, one more, and its step's, with a partial
#: block at each end (ceil(2 / 2) + 3 = 4), and a step adds 8 / 2 = 4.
WINDOW_BLOCKS = 2 * 4 + 4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, cortex.Model, cortex.Tokenizer]:
    folder = tmp_path_factory.mktemp("gemma") / "m"
    weights = write_tiny_hf(folder, model_type="gemma3_text", tokenizer="word")
    model, tok = cortex.load(folder)
    return weights, model, tok


def _engine(model: cortex.Model, tok: cortex.Tokenizer, evict: bool = True, **kw: object) -> cortex.Engine:
    kw = {"block_size": BLOCK, "max_num_batched_tokens": 8, "max_batch_size": 2, **kw}
    return cortex.Engine(model, tok, sliding_window_eviction=evict, **kw)  # type: ignore[arg-type]


def _prompt(n: int, seed: int, shared: int = 0) -> list[int]:
    """``n`` token ids (of the vocabulary of 96), the first ``shared`` the same for every seed."""
    rng = np.random.default_rng(seed)
    common = np.random.default_rng(99).integers(3, 96, shared)
    return [int(t) for t in np.concatenate([common, rng.integers(3, 96, n - shared)])]


def _params(n: int, max_tokens: int = 12) -> list[cortex.SamplingParams]:
    """Greedy for even requests, seeded sampling for odd ones."""
    return [
        cortex.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        if i % 2 == 0
        else cortex.SamplingParams(temperature=0.9, seed=i, max_tokens=max_tokens, ignore_eos=True)
        for i in range(n)
    ]


def test_greedy_decoding_through_evicting_layers_matches_numpy(gemma) -> None:
    """A 30-token prompt in chunks of 8, then 12 tokens one at a time: each is the
    reference's argmax over the whole sequence so far."""
    weights, model, tok = gemma
    engine = _engine(model, tok)
    ids = _prompt(30, 0)
    out = engine.generate_batch([ids], _params(1))[0]
    seq = list(ids)
    for token in out.token_ids:
        expected = forward(weights, family("gemma3_text"), seq)[-1]
        top2 = np.sort(expected)[-2:]
        if top2[1] - top2[0] > 1e-3:  # exact near-ties may order either way in f32
            assert token == int(np.argmax(expected))
        seq.append(token)
    assert len(seq) == 42
    stats = _idle(engine)
    assert stats["kv_window_blocks_total"] == WINDOW_BLOCKS
    assert stats["kv_window_blocks_free"] == WINDOW_BLOCKS


def test_window_layers_stay_within_their_blocks(gemma) -> None:
    """Two 150-token sequences at once need 75 blocks each in the global layer but their
    window layers only 12 blocks between them: the window layers' cache does not grow with
    the context. Without eviction there is no second pool."""
    _, model, tok = gemma
    engine = _engine(model, tok, kv_cache_tokens=640)
    outs = engine.generate_batch([_prompt(120, 1), _prompt(110, 2)], _params(2, max_tokens=30))
    assert [len(o.token_ids) for o in outs] == [30, 30]
    stats = _idle(engine)
    assert stats["kv_window_blocks_total"] == WINDOW_BLOCKS < 2 * 75
    assert stats["kv_window_blocks_free"] == WINDOW_BLOCKS
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 320
    plain = _idle(_engine(model, tok, evict=False, kv_cache_tokens=640))
    assert plain["kv_window_blocks_total"] == 0


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"kv_cache_tokens": 96},  # preemption and recomputation
        {"speculative": "prompt_lookup", "num_speculative_tokens": 3},
        {"max_batch_size": 4, "max_num_batched_tokens": 5},
        {"prefix_caching": False},
    ],
)
def test_evicting_engine_generates_what_a_full_cache_does(gemma, settings: dict) -> None:
    """Eight requests sharing a 20-token prefix (prefix-cache hits, which need the window
    before the hit cached too), greedy and seeded, under each setting."""
    _, model, tok = gemma
    prompts = [_prompt(24 + 3 * i, i, shared=20) for i in range(8)]
    want = _engine(model, tok, evict=False, **settings).generate_batch(prompts, _params(8))
    engine = _engine(model, tok, **settings)
    got = engine.generate_batch(prompts, _params(8))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = _idle(engine)
    assert stats["kv_window_blocks_free"] == stats["kv_window_blocks_total"] > 0
    if settings.get("prefix_caching", True):
        # Hits need the window before them cached too, in what the running sequences
        # leave free of this tiny pool: fewer hit than with every position kept
        # (measured: 100 and 140 of 140 prompt tokens at 2 and 4 sequences a step).
        assert stats["prefix_cache_hits"] >= 20, stats


def test_saved_prefixes_carry_the_window(gemma, tmp_path: Path) -> None:
    """A prefix saved by an evicting engine holds the window layers' keys and values for
    the window before its end only: it serves a new evicting engine (the whole prefix a
    hit), is refused by one that keeps every position, and a file from such an engine
    serves an evicting one."""
    _, model, tok = gemma
    prefix, rest = _prompt(40, 5), _prompt(6, 6)
    want = _engine(model, tok, evict=False, prefix_caching=False).generate_batch([prefix + rest], _params(1))
    windowed, full = tmp_path / "windowed.cxkv", tmp_path / "full.cxkv"
    assert _engine(model, tok).save_prefix(prefix, windowed) == 40
    assert _engine(model, tok, evict=False).save_prefix(prefix, full) == 40
    # The same blocks; the header says which file's window layers hold only the window.
    assert full.stat().st_size == windowed.stat().st_size - len(f',"window":{GEMMA_WINDOW}')
    assert _header(windowed)["window"] == GEMMA_WINDOW and "window" not in _header(full)
    for path in (windowed, full):
        engine = _engine(model, tok)
        assert engine.load_prefix(path) == 40
        before = _idle(engine)
        out = engine.generate_batch([prefix + rest], _params(1))[0]
        after = _idle(engine)
        assert out.token_ids == want[0].token_ids
        assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 40
    with pytest.raises(cortex.SavedPrefixError, match=f"only the last {GEMMA_WINDOW} positions"):
        _engine(model, tok, evict=False).load_prefix(windowed)
    # Keeping every position, the file from a full engine loads there too.
    assert _engine(model, tok, evict=False).load_prefix(full) == 40


def _header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[16 : 16 + struct.unpack_from("<I", data, 12)[0]])


def test_rotating_cache_and_window_layers_together(gemma) -> None:
    """A rotating cache (its ring turns the global layer) beside window layers that keep
    only their window: the same tokens as a rotating cache alone."""
    _, model, tok = gemma
    kw = {"kv_cache_size": 24, "rotating_kv_cache": True}
    prompts = [_prompt(40, 7), _prompt(33, 8)]
    want = _engine(model, tok, evict=False, **kw).generate_batch(prompts, _params(2, max_tokens=20))
    got = _engine(model, tok, **kw).generate_batch(prompts, _params(2, max_tokens=20))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_gemma_270m_past_its_window(gemma_path: Path) -> None:
    """The real Gemma 3 270M (window 512) on a 700-token prompt: the same greedy tokens
    with and without eviction, and its 15 local layers hold a few windows' blocks, not the
    context's."""
    model, tok = cortex.load(gemma_path)
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat. "
    ids = tok.encode(words * 45)[:700]
    params = [cortex.SamplingParams(temperature=0.0, max_tokens=8)]
    outs = {}
    for evict in (True, False):
        engine = cortex.Engine(
            model, tok, sliding_window_eviction=evict, max_batch_size=2, kv_cache_tokens=4096
        )
        outs[evict] = engine.generate_batch([ids], params)[0].token_ids
        stats = _idle(engine)
        if evict:
            # Two sequences' windows of 512 (32 blocks, one more and a partial one at
            # each end) and a step of 256 positions (16 blocks).
            assert stats["kv_window_blocks_total"] == 2 * 35 + 16
    assert outs[True] == outs[False]
