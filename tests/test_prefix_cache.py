"""Automatic prefix caching on the real SmolLM2 model: requests that begin alike share the
cached keys and values of their common full blocks, and what any request generates is
exactly what it generates on an engine that computes every prompt in full."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hf_models import write_tiny_hf
from test_engine import _idle

import cortex

SYSTEM = (
    "You are a careful assistant for a small library of programming books. Answer in one "
    "short sentence, name the book you would recommend when it helps, and never invent a "
    "title. The shelves hold: The Rust Programming Language; Programming Rust; Rust for "
    "Rustaceans; Structure and Interpretation of Computer Programs; The C Programming "
    "Language; Python Crash Course; Fluent Python; Effective Java; Crafting Interpreters; "
    "Designing Data-Intensive Applications; Computer Systems: A Programmer's Perspective."
)
QUESTIONS = [
    "Which book teaches Rust from scratch?",
    "I know Python already. What next?",
    "What should I read to write an interpreter?",
    "Is there anything about databases?",
    "Recommend a book on C.",
    "What is ownership in Rust?",
    "Which book is the most advanced one on Rust?",
    "What is a closure?",
    "Suggest something about how computers run programs.",
    "Do you have a Java book?",
]


def _messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i})"},
    ]


def _params(n: int) -> list[cortex.SamplingParams]:
    """Greedy for even requests, seeded sampling for odd ones."""
    return [
        cortex.SamplingParams(temperature=0.0, max_tokens=12)
        if i % 2 == 0
        else cortex.SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=12)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def uncached(smollm) -> list[list[int]]:
    """What 50 requests with one system prompt generate when every prompt is computed."""
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=8, prefix_caching=False)
    outs = engine.generate_batch([_messages(i) for i in range(50)], _params(50))
    stats = engine.stats()
    assert not stats["prefix_caching"] and stats["prefix_cache_hits"] == 0
    return [o.token_ids for o in outs]


def test_50_requests_sharing_a_system_prompt_hit_the_cache_and_generate_the_same(smollm, uncached):
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=8)
    system = [{"role": "system", "content": SYSTEM}]
    shared = len(tok.apply_chat_template(system, add_generation_prompt=False, tokenize=True))
    outs = engine.generate_batch([_messages(i) for i in range(50)], _params(50))
    assert [o.token_ids for o in outs] == uncached
    stats = _idle(engine)
    assert stats["prefix_caching"]
    # All but the first batch find the system prompt's full blocks.
    blocks = (shared - 1) // 16 * 16
    assert stats["prefix_cache_hits"] >= 40 * blocks, stats
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert stats["prefix_cache_blocks"] > 0
    # Cached blocks nobody holds count as free.
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # Prompt tokens computed: far fewer than the prompts hold.
    prompt_tokens = sum(o.prompt_tokens for o in outs)
    assert stats["prompt_tokens"] == prompt_tokens - stats["prefix_cache_hits"]


def test_sharing_survives_a_tiny_cache_with_preemption_and_eviction(smollm, uncached):
    """16 blocks of 16 for up to 8 requests of ~150 tokens: requests wait, are preempted
    and recomputed, cached blocks are evicted for new ones, and outputs do not change."""
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=8, kv_cache_tokens=256, block_size=16)
    outs = engine.generate_batch([_messages(i) for i in range(20)], _params(20))
    assert [o.token_ids for o in outs] == uncached[:20]
    stats = _idle(engine)
    assert stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 16


def test_a_follow_up_turn_reuses_the_whole_conversation(smollm):
    """The second turn's prompt begins with the first turn and its answer: only the new
    tokens (and the block they start in) are computed."""
    model, tok = smollm
    engine = cortex.Engine(model, tok)
    first = _messages(0)
    answer = engine.generate_batch([first], max_tokens=24)[0]
    ids = tok.apply_chat_template(first, add_generation_prompt=True, tokenize=True)
    assert isinstance(ids, list)
    follow_up = ids + answer.token_ids + tok.encode("\nAnd one more, please.")
    before = engine.stats()
    reply = engine.generate_batch([follow_up], max_tokens=4)[0]
    after = _idle(engine)
    hit = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    # Every full block of the first turn's prompt and answer but the last token's.
    assert hit == (len(ids) + len(answer.token_ids) - 1) // 16 * 16
    computed = after["prompt_tokens"] - before["prompt_tokens"]
    assert computed == len(follow_up) - hit
    plain = cortex.Engine(model, tok, prefix_caching=False)
    assert reply.token_ids == plain.generate_batch([follow_up], max_tokens=4)[0].token_ids


def test_a_rotating_cache_does_not_cache_prefixes(smollm):
    model, tok = smollm
    engine = cortex.Engine(model, tok, kv_cache_size=64, rotating_kv_cache=True)
    engine.generate_batch([_messages(0), _messages(1)], max_tokens=2)
    stats = _idle(engine)
    assert not stats["prefix_caching"]
    assert stats["prefix_cache_hits"] == stats["prefix_cache_queries"] == 0


# ── Saved prefixes ───────────────────────────────────────────────────────────────────────

SYSTEM_ONLY = [{"role": "system", "content": SYSTEM}]


@pytest.fixture(scope="module")
def saved(smollm, tmp_path_factory) -> tuple[Path, int]:
    """The system prompt saved from one engine: (file, tokens saved)."""
    model, tok = smollm
    path = tmp_path_factory.mktemp("saved") / "system.cxkv"
    engine = cortex.Engine(model, tok)
    n = engine.save_prefix(SYSTEM_ONLY, path)
    ids = tok.apply_chat_template(SYSTEM_ONLY, add_generation_prompt=False, tokenize=True)
    assert n == len(ids) // 16 * 16 > 0
    # Saving again reads the cached blocks; the file is the same.
    first = path.read_bytes()
    assert engine.save_prefix(SYSTEM_ONLY, path) == n and path.read_bytes() == first
    return path, n


def test_a_saved_system_prompt_serves_a_new_engine(smollm, saved, uncached):
    model, tok = smollm
    path, n = saved
    engine = cortex.Engine(model, tok)
    assert engine.load_prefix(path) == n
    before = _idle(engine)
    out = engine.generate_batch([_messages(2)], _params(3)[2:])[0]
    after = _idle(engine)
    assert out.token_ids == uncached[2]
    # The whole saved prefix came from the cache; only the question was computed.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == n
    assert after["prompt_tokens"] - before["prompt_tokens"] == out.prompt_tokens - n


def _tampered(path: Path, tmp_path: Path, change) -> Path:
    data = bytearray(path.read_bytes())
    header_len = struct.unpack_from("<I", data, 12)[0]
    out = tmp_path / "tampered.cxkv"
    out.write_bytes(change(data, 16 + header_len))
    return out


def _header(data: bytes | bytearray, at: int, **fields: object) -> bytes:
    header = json.loads(data[16:at])
    header.update(fields)
    raw = json.dumps(header).encode()
    return bytes(data[:12]) + struct.pack("<I", len(raw)) + raw + bytes(data[at:])


def _resealed(data: bytes, at: int) -> bytes:
    """``data`` with its header's checksum made right again (a deliberate forgery)."""
    return _header(data, at, sha256=hashlib.sha256(data[at:]).hexdigest())


def _scaled(data: bytearray, at: int) -> bytes:
    """Every key and value 1.5 times as large, checksum and all: another model's."""
    tokens = json.loads(data[16:at])["tokens"]
    values = np.frombuffer(bytes(data[at + 4 * tokens :]), dtype="<f2") * 1.5
    return _resealed(bytes(data[: at + 4 * tokens]) + values.astype("<f2").tobytes(), at)


def _flipped(data: bytearray, at: int) -> bytes:
    """One bit of the last block flipped."""
    data[-3] ^= 0x10
    return bytes(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d, at: b"NOTCORTX" + bytes(d[8:]), "magic"),
        (lambda d, at: bytes(d[:-10]), "truncated"),
        (lambda d, at: bytes(d) + b"\0", "padded"),
        (lambda d, at: bytes(d[:20]), "truncated in its header"),
        (lambda d, at: bytes(d[:16]) + b"{" * (at - 16) + bytes(d[at:]), "malformed header"),
        (lambda d, at: bytes(d[:8]) + struct.pack("<I", 9) + bytes(d[12:]), "version 9"),
        (
            lambda d, at: _resealed(bytes(d[:at]) + struct.pack("<I", 2**31) + bytes(d[at + 4 :]), at),
            "vocabulary",
        ),
        (_flipped, "damaged"),
        (lambda d, at: _header(d, at, tokens=7), "not a whole number of blocks"),
        (
            lambda d, at: _header(d, at, model={**json.loads(d[16:at])["model"], "num_parameters": 7}),
            "another model",
        ),
        (lambda d, at: _header(d, at, dtype="f32"), "f32 cache"),
        (_scaled, "another model of the same shape"),
    ],
)
def test_a_bad_saved_prefix_is_refused_whole(smollm, saved, uncached, tmp_path, change, match):
    """Malformed, truncated, foreign or altered files raise SavedPrefixError naming the
    file and put nothing in the cache; the engine goes on generating exactly."""
    model, tok = smollm
    path = _tampered(saved[0], tmp_path, change)
    engine = cortex.Engine(model, tok)
    with pytest.raises(cortex.SavedPrefixError, match=match) as e:
        engine.load_prefix(path)
    assert e.value.path == str(path)
    assert isinstance(e.value, ValueError)
    before = _idle(engine)
    out = engine.generate_batch([_messages(2)], _params(3)[2:])[0]
    after = _idle(engine)
    assert out.token_ids == uncached[2]
    # At most the first block, which the check computes itself, came from the cache.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] <= 16


def test_saved_prefixes_need_the_same_cache_layout_and_caching(smollm, saved, tmp_path):
    model, tok = smollm
    with pytest.raises(cortex.SavedPrefixError, match="blocks of 16"):
        cortex.Engine(model, tok, block_size=32).load_prefix(saved[0])
    with pytest.raises(cortex.SavedPrefixError, match="could not be read"):
        cortex.Engine(model, tok).load_prefix(tmp_path / "missing.cxkv")
    plain = cortex.Engine(model, tok, prefix_caching=False)
    with pytest.raises(cortex.RequestValidationError, match="prefix caching"):
        plain.save_prefix(SYSTEM_ONLY, tmp_path / "x.cxkv")
    with pytest.raises(cortex.RequestValidationError, match="fills no cache block"):
        cortex.Engine(model, tok).save_prefix([1, 2, 3], tmp_path / "x.cxkv")
    with pytest.raises(cortex.SavedPrefixError, match="could not be written"):
        cortex.Engine(model, tok).save_prefix(SYSTEM_ONLY, tmp_path / "no" / "such" / "dir.cxkv")
    assert not (tmp_path / "x.cxkv").exists()


def test_a_model_of_the_same_shape_with_other_weights_is_caught(tmp_path):
    """Two tiny models that differ only in their weights have the same identity; the
    check of the first block tells them apart."""
    for seed in (0, 1):
        write_tiny_hf(tmp_path / f"m{seed}", seed=seed, tokenizer="word")
    (m0, tok), (m1, _) = (cortex.load(tmp_path / f"m{s}") for s in (0, 1))
    ids = list(range(3, 3 + 12))
    path = tmp_path / "p.cxkv"
    assert cortex.Engine(m0, tok, block_size=4).save_prefix(ids, path) == 12
    assert cortex.Engine(m0, tok, block_size=4).load_prefix(path) == 12
    with pytest.raises(cortex.SavedPrefixError, match="another model of the same shape"):
        cortex.Engine(m1, tok, block_size=4).load_prefix(path)
