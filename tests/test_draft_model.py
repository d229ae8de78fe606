"""Speculative decoding with a draft model on the real SmolLM2 model, its 4-bit conversion
drafting: greedy output is plain decoding's, sampled output follows plain sampling's
distribution (a two-sample chi-square test), seeds reproduce in any batch, drafting
requests share batches with every other kind, and the same keywords reach
``cortex.generate``, ``cortex.stream_generate`` and ``cortex.serve``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import openai
import pytest
from hf_models import write_tiny_hf
from test_engine import _idle
from test_server import _Cli
from test_speculative import REWRITE, greedy_matches_plain

import cortex


@pytest.fixture(scope="module")
def draft(smollm):
    """The model requantized to 4 bits, groups of 32: the same tokenizer, about half the
    bytes per token."""
    model, _ = smollm
    return model.requantize(4, group_size=32)


def test_greedy_is_plain_greedy_on_every_golden_prompt(smollm, golden, draft):
    stats = greedy_matches_plain(smollm, golden, 48, speculative=draft, num_speculative_tokens=4)
    # A 4-bit copy of the model agrees with it most of the time.
    assert stats["speculative_acceptance_rate"] > 0.5, stats
    assert stats["steps"] < stats["generation_tokens"]


def _chi_square(a: Counter[int], b: Counter[int]) -> tuple[float, int]:
    """Two-sample chi-square statistic of two histograms of equal totals (categories seen
    fewer than 10 times in both pooled into one), and its degrees of freedom."""
    keys = sorted(set(a) | set(b))
    small = [k for k in keys if a[k] + b[k] < 10]
    cells = [(a[k], b[k]) for k in keys if k not in small]
    if small:
        cells.append((sum(a[k] for k in small), sum(b[k] for k in small)))
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells if x + y)
    return stat, len(cells) - 1


def _chi_square_critical(df: int) -> float:
    """The chi-square distribution's 99.9th percentile for ``df`` degrees of freedom
    (Wilson and Hilferty's approximation: within 1 % of the exact value from 3 up)."""
    z = 3.0902  # the standard normal's 99.9th percentile
    c = 2 / (9 * df)
    return df * (1 - c + z * c**0.5) ** 3


def test_sampled_output_follows_plain_sampling(smollm, draft):
    """600 seeded requests, three tokens each at temperature 1 within the top 8: every
    token is drawn by verifying the draft model's proposal, and the second and third
    (which depend on the first, so that they test the chain) are distributed as plain
    sampling's (two-sample chi-square, 0.1 % level)."""
    model, tok = smollm
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=True
    )
    n = 600
    params = [
        cortex.SamplingParams(temperature=1.0, top_k=8, max_tokens=3, seed=i, ignore_eos=True)
        for i in range(n)
    ]
    plain = cortex.Engine(model, tok, max_batch_size=64)
    spec = cortex.Engine(model, tok, max_batch_size=64, speculative=draft, num_speculative_tokens=2)
    outs = {
        "plain": plain.generate_batch([prompt] * n, params),
        "spec": spec.generate_batch([prompt] * n, params),
    }
    assert all(o.error is None and len(o.token_ids) == 3 for v in outs.values() for o in v)
    assert _idle(spec)["speculative_accepted_tokens"] > 0
    for position in (1, 2):
        a = Counter(o.token_ids[position] for o in outs["plain"])
        b = Counter(o.token_ids[position] for o in outs["spec"])
        stat, df = _chi_square(a, b)
        assert df >= 3, (a, b)
        assert stat < _chi_square_critical(df), (position, stat, df, a, b)


def test_seeds_reproduce_in_mixed_batches(smollm, draft):
    """Seeded sampled requests give the same tokens again, alone or beside greedy,
    penalised, constrained and prompt-lookup-shaped requests; the greedy one is plain
    decoding's."""
    model, tok = smollm
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    prompts = [REWRITE, "List three colours:", REWRITE, "Answer in JSON: is water wet?", "Count: one, two,"]
    params = [
        cortex.SamplingParams(temperature=0.0, max_tokens=32),
        cortex.SamplingParams(temperature=0.8, seed=3, max_tokens=32),
        cortex.SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=32, logprobs=2),
        cortex.SamplingParams(temperature=0.0, max_tokens=32, json_schema=schema),
        cortex.SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=32),
    ]
    spec = cortex.Engine(model, tok, max_batch_size=8, speculative=draft)
    first = spec.generate_batch(prompts, params)
    assert all(o.error is None for o in first)
    again = spec.generate_batch(prompts[1:3], params[1:3])
    assert [o.token_ids for o in again] == [o.token_ids for o in first[1:3]]
    assert spec.generate_batch([prompts[2]], params[2])[0].token_ids == first[2].token_ids
    plain = cortex.Engine(model, tok, max_batch_size=8)
    want = plain.generate_batch([prompts[0], prompts[4]], [params[0], params[4]])
    assert [first[0].token_ids, first[4].token_ids] == [o.token_ids for o in want]
    assert _idle(spec)["speculative_accepted_tokens"] > 0


def test_prefix_cache_and_saved_prefixes_keep_the_draft_in_step(smollm, draft, tmp_path: Path):
    """A prompt found in the prefix cache, or loaded from a saved prefix (which holds the
    model's keys and values only: the draft model computes its own), drafts as well as a
    fresh one: greedy output is plain decoding's and most drafts are kept."""
    model, tok = smollm
    ids = tok.apply_chat_template(REWRITE, add_generation_prompt=True, tokenize=True)
    want = cortex.Engine(model, tok).generate_batch([ids], max_tokens=40, ignore_eos=True)[0].token_ids
    path = tmp_path / "rewrite.prefix"
    cortex.Engine(model, tok).save_prefix(ids, path)
    for load in (False, True):
        spec = cortex.Engine(model, tok, speculative=draft)
        if load:
            assert spec.load_prefix(path) > 0
        else:
            spec.generate_batch([ids], max_tokens=1)
        before = spec.stats()
        assert spec.generate_batch([ids], max_tokens=40, ignore_eos=True)[0].token_ids == want
        stats = _idle(spec)
        assert stats["prefix_cache_hits"] - before["prefix_cache_hits"] >= len(ids) // 16 * 16 - 16
        drafted = stats["speculative_draft_tokens"] - before["speculative_draft_tokens"]
        kept = stats["speculative_accepted_tokens"] - before["speculative_accepted_tokens"]
        assert kept > 0.5 * drafted, (load, kept, drafted)


def test_draft_model_settings_are_checked(smollm, tmp_path: Path):
    model, tok = smollm
    write_tiny_hf(tmp_path / "tiny", shards=1)
    other = cortex.load_model(tmp_path / "tiny")
    with pytest.raises(cortex.RequestValidationError, match="vocabulary") as e:
        cortex.Engine(model, tok, speculative=other)
    assert e.value.param == "speculative"
    with pytest.raises(cortex.RequestValidationError, match="draft Model, got int"):
        cortex.Engine(model, tok, speculative=3)  # type: ignore[arg-type]
    with pytest.raises(cortex.RequestValidationError, match="num_speculative_tokens"):
        cortex.Engine(model, tok, speculative=model, num_speculative_tokens=0)
    with pytest.raises(cortex.RequestValidationError, match="needs speculative"):
        cortex.Engine(model, tok, num_speculative_tokens=3)
    with pytest.raises(cortex.RequestValidationError, match="needs speculative"):
        cortex.generate(model, tok, "Hi", num_speculative_tokens=3)


def test_generate_and_stream_generate_take_the_keywords(smollm, draft):
    """The model's own engine speculates when asked (one engine per setting): the text is
    plain decoding's, and that setting's engine reports the drafts."""
    model, tok = smollm
    want = cortex.generate(model, tok, REWRITE, max_tokens=40)
    for speculative in ("prompt_lookup", draft):
        assert cortex.generate(model, tok, REWRITE, max_tokens=40, speculative=speculative) == want
        streamed = cortex.stream_generate(
            model, tok, REWRITE, max_tokens=40, speculative=speculative, num_speculative_tokens=3
        )
        assert "".join(r.text for r in streamed) == want
        for n in (4, 3):
            stats = cortex._core.engine_stats(model, speculative=speculative, num_speculative_tokens=n)
            assert stats["speculative_accepted_tokens"] > 0, (speculative, n)
    assert cortex._core.engine_stats(model)["speculative_draft_tokens"] == 0
    with pytest.raises(cortex.RequestValidationError, match="speculative"):
        cortex.generate(model, tok, "Hi", speculative="medusa")


def test_the_server_drafts_with_a_draft_model(smollm, draft):
    """``cortex.serve(speculative=draft_model)`` (``cortex serve --draft-model``): the
    openai client gets plain decoding's greedy text."""
    model, tok = smollm
    want = cortex.Engine(model, tok).generate_batch([REWRITE], max_tokens=32, temperature=0.0)[0].text
    srv = cortex.serve(model, tok, port=0, block=False, speculative=draft)
    assert srv is not None
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
        resp = client.chat.completions.create(
            model=srv.model_name, messages=REWRITE, max_tokens=32, temperature=0
        )
        assert resp.choices[0].message.content == want
        client.close()
        accepted = srv.stats()["speculative_accepted_tokens"]
        assert accepted > 0
        with urllib.request.urlopen(srv.url + "/metrics") as r:
            metrics = r.read().decode()
        assert f"cortex_speculative_accepted_tokens_total {accepted:.0f}" in metrics
    finally:
        srv.shutdown(timeout=10)


def test_cortex_serve_draft_model_flag(model_path: Path):
    """``cortex serve --draft-model REF``: drafts are taken (``/metrics``) and SIGTERM still
    stops it cleanly; ``--num-speculative-tokens`` alone is refused."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cortex",
            "serve",
            "--model",
            str(model_path),
            "--num-speculative-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1 and "needs --speculative or --draft-model" in proc.stderr, proc.stderr
    cli = _Cli("--model", str(model_path), "--draft-model", str(model_path), "--port", "0")
    try:
        name, url = cli.wait_serving()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        out = client.completions.create(
            model=name, prompt="One, two, three, four,", max_tokens=24, temperature=0
        )
        assert out.choices[0].text
        client.close()
        with urllib.request.urlopen(url + "/metrics") as r:
            metrics = r.read().decode()
        drafted = re.search(r"^cortex_speculative_accepted_tokens_total (\d+)$", metrics, re.M)
        assert drafted and int(drafted[1]) > 0, metrics
        cli.proc.send_signal(signal.SIGTERM)
        assert cli.wait(60) == 0
    finally:
        cli.close()
