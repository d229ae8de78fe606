"""SamplingParams validation and sampler behaviour on the real model."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import cortex
from cortex import SamplingParams

PROMPT = "Once upon a time, there was a little robot who"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 3.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -5),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.nan),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("stop", [""]),
        ("stop", ["x" * 5000]),
        ("stop", ["s"] * 1000),
        ("seed", -2),
        ("seed", 2**64),
        ("logprobs", 10**6),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(cortex.RequestValidationError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert info.value.param == field
    assert field in str(info.value)


@pytest.mark.parametrize(("field", "value"), [("max_tokens", "10"), ("max_tokens", 3.5), ("stop", 5)])
def test_wrong_types_are_type_errors(field, value):
    with pytest.raises(TypeError, match=field):
        SamplingParams(**{field: value})


def test_defaults_and_seed_minus_one():
    p = SamplingParams(seed=-1)
    assert p.seed is None and p.temperature == 0.0 and p.max_tokens == 256 and p.top_p == 1.0
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def _sample(smollm, **kw):
    model, tok = smollm
    return [r.token for r in cortex.stream_generate(model, tok, PROMPT, max_tokens=12, **kw)]


def test_same_seed_same_text(smollm):
    kw = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}
    assert _sample(smollm, **kw) == _sample(smollm, **kw)


def test_different_seeds_differ(smollm):
    runs = {tuple(_sample(smollm, temperature=1.5, seed=s)) for s in range(4)}
    assert len(runs) > 1


def test_top_k_one_is_greedy(smollm):
    assert _sample(smollm, temperature=1.5, top_k=1, seed=7) == _sample(smollm)


def test_logprobs_reported_from_the_raw_distribution(smollm):
    model, tok = smollm
    ids = tok.encode(PROMPT)
    logits = model.forward(ids).astype(np.float64)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = next(iter(cortex.stream_generate(model, tok, ids, max_tokens=1, logprobs=3)))
    assert first.logprobs is not None
    logprob, top = first.logprobs
    assert [t for t, _ in top] == list(np.argsort(-expected)[:3])
    assert logprob == pytest.approx(expected[first.token], abs=1e-4)


def test_repetition_penalty_discourages_repeats(smollm):
    """Greedy decoding of this prompt loops on digits; a strong penalty must make every
    token that was already in the context rarer."""
    model, tok = smollm
    prompt = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5,"
    ids = tok.encode(prompt)

    def repeats(**kw):
        out = [r.token for r in cortex.stream_generate(model, tok, ids, max_tokens=16, **kw)]
        return sum(t in set(ids) or t in out[:i] for i, t in enumerate(out))

    assert repeats(repetition_penalty=2.0) < repeats()


def test_repetition_penalty_changes_exactly_the_seen_logits(smollm):
    """First step: penalised greedy picks argmax of the logits with seen tokens scaled."""
    model, tok = smollm
    ids = tok.encode(PROMPT)
    logits = model.forward(ids)
    penalised = logits.copy()
    for t in set(ids):
        penalised[t] = penalised[t] / 1.3 if penalised[t] > 0 else penalised[t] * 1.3
    first = next(iter(cortex.stream_generate(model, tok, ids, max_tokens=1, repetition_penalty=1.3)))
    assert first.token == int(np.argmax(penalised))


def test_one_model_from_sixteen_threads(smollm):
    """RELIABILITY G4: one model shared by 16 Python threads; every greedy output equals
    the single-threaded one and no call fails."""
    import concurrent.futures

    model, tok = smollm
    prompts = [PROMPT, "The capital of France is", "def fibonacci(n):", "Water boils at"]
    expected = {p: cortex.generate(model, tok, p, max_tokens=8) for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = [(p, pool.submit(cortex.generate, model, tok, p, max_tokens=8)) for p in prompts * 4]
        for p, job in jobs:
            assert job.result(timeout=300) == expected[p]


def test_stop_may_be_one_string(smollm):
    """``stop="..."`` as the OpenAI client sends it: the same as a list of that string."""
    model, tok = smollm
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"] and SamplingParams().stop == []
    full = cortex.generate(model, tok, PROMPT, max_tokens=24)
    stop = full[8:14]
    cut = cortex.generate(model, tok, PROMPT, max_tokens=24, stop=stop)
    assert cut == full[: full.index(stop)] == cortex.generate(model, tok, PROMPT, max_tokens=24, stop=[stop])
    with pytest.raises(cortex.RequestValidationError, match="stop"):
        SamplingParams(stop="")


def test_other_tools_argument_names():
    """transformers' ``max_new_tokens`` and ``do_sample``, mlx-lm's ``temp``."""
    assert SamplingParams(max_new_tokens=7).max_tokens == 7
    assert SamplingParams(max_new_tokens=7, max_tokens=7).max_tokens == 7
    assert SamplingParams(temp=0.6).temperature == pytest.approx(0.6)
    assert SamplingParams(do_sample=False).temperature == 0.0
    assert SamplingParams(do_sample=True).temperature == 1.0  # transformers' default
    assert SamplingParams(do_sample=True, temperature=0.3).temperature == pytest.approx(0.3)
    assert SamplingParams(do_sample=True, temp=0.4).temperature == pytest.approx(0.4)
    assert SamplingParams(do_sample=False, temperature=0.0).temperature == 0.0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_new_tokens": 5, "max_tokens": 6}, "max_new_tokens"),
        ({"temp": 0.5, "temperature": 0.7}, "temp"),
        ({"do_sample": True, "temperature": 0.0}, "do_sample"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temp": -1.0}, "temp"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_conflicting_or_invalid_aliases_name_the_argument(kwargs, param):
    with pytest.raises(cortex.RequestValidationError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and param in str(info.value)


def test_do_sample_false_with_a_temperature_is_greedy_with_a_warning():
    """As in transformers: ``do_sample=False`` decodes greedily, and the sampling settings
    given with it are named in a warning (pointing at the caller), not an error."""
    with pytest.warns(cortex.CortexWarning, match=r"do_sample=False.*temperature=0\.7.*top_p=0\.9") as rec:
        p = SamplingParams(do_sample=False, temperature=0.7, top_p=0.9)
    assert p.temperature == 0.0 and len(rec) == 1 and rec[0].filename == __file__
    with pytest.warns(cortex.CortexWarning, match="temp=0.5"):
        assert SamplingParams(do_sample=False, temp=0.5).temperature == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingParams(do_sample=False, temperature=0.0)
        SamplingParams(do_sample=False)
        SamplingParams(temperature=0.7)


def test_do_sample_true_brings_transformers_top_k():
    """``do_sample=True`` samples as transformers' defaults do: temperature 1.0 and top_k
    50, unless given; without ``do_sample`` our default (no top-k) holds."""
    assert (SamplingParams(do_sample=True).temperature, SamplingParams(do_sample=True).top_k) == (1.0, 50)
    assert SamplingParams(do_sample=True, top_k=0).top_k == 0
    assert SamplingParams(do_sample=True, top_k=5).top_k == 5
    assert SamplingParams(temperature=1.0).top_k == 0 and SamplingParams().top_k == 0


def test_aliases_reach_generation(smollm):
    model, tok = smollm
    responses = list(cortex.stream_generate(model, tok, PROMPT, max_new_tokens=5, do_sample=False))
    assert responses[-1].generation_tokens == 5 and responses[-1].finish_reason == "length"
    assert "".join(r.text for r in responses) == cortex.generate(model, tok, PROMPT, max_tokens=5)
    sampled = [
        r.token for r in cortex.stream_generate(model, tok, PROMPT, max_new_tokens=12, temp=1.0, seed=1234)
    ]
    assert sampled == _sample(smollm, temperature=1.0, seed=1234)
    with pytest.warns(cortex.CortexWarning, match="do_sample=False"):
        greedy = cortex.generate(model, tok, PROMPT, max_new_tokens=5, do_sample=False, temperature=0.7)
    assert greedy == cortex.generate(model, tok, PROMPT, max_tokens=5)
