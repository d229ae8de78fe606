"""Automatic prefix caching on the real SmolLM2 model: requests that begin alike share the
cached keys and values of their common full blocks, and what any request generates is
exactly what it generates on an engine that computes every prompt in full."""

from __future__ import annotations

import time

import pytest

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


def _idle(engine: cortex.Engine, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["requests_waiting"] + stats["requests_running"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


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
