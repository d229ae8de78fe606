"""Speculative decoding by prompt lookup on the real SmolLM2 model: greedy and seeded output
are exactly plain decoding's (and greedy, on the exact f32 path, Hugging Face
transformers' own), and requests that speculate share batches with requests that
cannot."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest
from test_engine import _idle

import cortex

TEXT = (
    "The old lighthouse stood at the end of the harbour wall. Every evening the keeper climbed "
    "its ninety-one steps, trimmed the wick, polished the great lens and lit the lamp, so that "
    "the fishing boats could find their way home through the fog. In winter the storms threw "
    "spray over the gallery, and the keeper wrote in his log the speed of the wind, the height "
    "of the waves and the names of the boats that passed."
)
REWRITE = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{TEXT}"}]


def greedy_matches_plain(smollm, golden, max_tokens: int, **speculation: Any) -> dict[str, float]:
    """Speculative greedy output against plain decoding's on every golden prompt and a
    rewrite, batched together and each alone; returns the speculating engine's stats."""
    model, tok = smollm
    prompts = [case["input_ids"] for case in golden["greedy"]]
    prompts.append(tok.apply_chat_template(REWRITE, add_generation_prompt=True, tokenize=True))
    plain = cortex.Engine(model, tok, max_batch_size=8)
    spec = cortex.Engine(model, tok, max_batch_size=8, **speculation)
    want = [o.token_ids for o in plain.generate_batch(prompts, max_tokens=max_tokens, ignore_eos=True)]
    # Batched together, and each alone.
    assert [o.token_ids for o in spec.generate_batch(prompts, max_tokens=max_tokens, ignore_eos=True)] == want
    for p, w in zip(prompts, want):
        assert spec.generate_batch([p], max_tokens=max_tokens, ignore_eos=True)[0].token_ids == w
    return _idle(spec)


def test_greedy_is_plain_greedy_on_every_golden_prompt_and_a_rewrite(smollm, golden):
    stats = greedy_matches_plain(smollm, golden, 64, speculative="prompt_lookup")
    assert stats["speculative_accepted_tokens"] > 50, stats
    assert 0 < stats["speculative_acceptance_rate"] <= 1
    # Fewer steps than tokens: drafts were taken in bulk.
    assert stats["steps"] < stats["generation_tokens"]


def test_the_exact_path_with_drafts_matches_transformers(smollm, golden):
    """Dequantized to f32 (test_golden's exact path), speculative greedy output is the
    reference's token for token."""
    model, tok = smollm
    exact = model.dequantize()
    spec = cortex.Engine(exact, tok, speculative="prompt_lookup", num_speculative_tokens=6)
    for case in golden["greedy"]:
        out = spec.generate_batch([case["input_ids"]], max_tokens=len(case["new_ids"]), ignore_eos=True)[0]
        ref = case["new_ids"]
        assert out.token_ids[: len(ref)] == ref, case["prompt"]


def test_mixed_batches_of_speculating_sampled_and_constrained_requests(smollm):
    model, tok = smollm
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    prompts = [REWRITE, "List three colours:", REWRITE, "Answer in JSON: is water wet?"]
    params = [
        cortex.SamplingParams(temperature=0.0, max_tokens=40),
        cortex.SamplingParams(temperature=0.8, seed=3, max_tokens=40),
        cortex.SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=40),
        cortex.SamplingParams(temperature=0.0, max_tokens=40, json_schema=schema),
    ]
    spec = cortex.Engine(model, tok, max_batch_size=4, speculative="prompt_lookup")
    first = spec.generate_batch(prompts, params)
    assert all(o.error is None for o in first)
    plain = cortex.Engine(model, tok, max_batch_size=4)
    assert first[0].token_ids == plain.generate_batch([prompts[0]], params[0])[0].token_ids
    assert json.loads(first[3].text)["ok"] in (True, False)
    # Seeded requests draw what plain decoding draws, in another batch or alone.
    want = [o.token_ids for o in plain.generate_batch(prompts[1:3], params[1:3])]
    assert [o.token_ids for o in first[1:3]] == want
    assert spec.generate_batch([prompts[2]], params[2])[0].token_ids == want[1]
    assert _idle(spec)["speculative_accepted_tokens"] > 0


def test_speculation_settings_are_checked(smollm):
    model, tok = smollm
    with pytest.raises(cortex.RequestValidationError, match="speculative") as e:
        cortex.Engine(model, tok, speculative="medusa")
    assert e.value.param == "speculative"
    with pytest.raises(cortex.RequestValidationError, match="num_speculative_tokens"):
        cortex.Engine(model, tok, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(cortex.RequestValidationError, match="num_speculative_tokens"):
        cortex.Engine(model, tok, speculative="prompt_lookup", num_speculative_tokens=17)


def test_drafts_respect_max_tokens_and_a_rotating_cache(smollm):
    """Drafts never take a request past ``max_tokens``, and a rotating cache gets none that
    would wrap it (a rejected one would have overwritten a position still in view)."""
    model, tok = smollm
    ids = tok.apply_chat_template(REWRITE, add_generation_prompt=True, tokenize=True)
    spec = cortex.Engine(model, tok, speculative="prompt_lookup")
    for n in (1, 2, 3, 7):
        assert spec.generate_batch([ids], max_tokens=n, ignore_eos=True)[0].generation_tokens == n
    size = len(ids) + 24
    plain = cortex.Engine(model, tok, kv_cache_size=size, rotating_kv_cache=True)
    rolling = cortex.Engine(
        model, tok, kv_cache_size=size, rotating_kv_cache=True, speculative="prompt_lookup"
    )
    want = plain.generate_batch([ids], max_tokens=60, ignore_eos=True)[0].token_ids
    assert rolling.generate_batch([ids], max_tokens=60, ignore_eos=True)[0].token_ids == want


def test_the_server_speculates_with_the_official_client(smollm):
    """``cortex.serve(speculative=...)`` (``cortex serve --speculative``): a chat request
    through the openai client gets plain decoding's greedy text, streamed or not, and the
    engine reports the drafts it accepted; /metrics shows the prefix cache at work."""
    model, tok = smollm
    want = cortex.Engine(model, tok).generate_batch([REWRITE], max_tokens=48, temperature=0.0)[0].text
    srv = cortex.serve(model, tok, port=0, block=False, speculative="prompt_lookup", num_speculative_tokens=5)
    assert srv is not None
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
        resp = client.chat.completions.create(
            model=srv.model_name,
            messages=REWRITE,
            max_tokens=48,
            temperature=0,
        )
        assert resp.choices[0].message.content == want
        stream = client.chat.completions.create(
            model=srv.model_name,
            messages=REWRITE,
            max_tokens=48,
            temperature=0,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
        client.close()
        stats = srv.stats()
        assert stats["speculative_accepted_tokens"] > 0
        # The second request found the first one's prompt in the cache.
        assert stats["prefix_cache_hits"] > 0
        with urllib.request.urlopen(srv.url + "/metrics") as r:
            metrics = r.read().decode()
        assert "cortex_prefix_cache_hits_total" in metrics
    finally:
        srv.shutdown(timeout=10)
