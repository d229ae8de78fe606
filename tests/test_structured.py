"""Structured output on the default model (SmolLM2-135M-Instruct): JSON schemas, JSON
objects, regexes and Lark grammars constrain decoding, greedy and seeded; every output must
parse and validate (with the `jsonschema` package, an implementation we did not write), end
with "stop", and come out the same in a batch as alone. Bad constraints are typed errors
naming their parameter, raised before any decoding."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import cortex

# Schemas a user would send (tests/fixtures/schemas/): flat and nested objects, arrays with
# bounds, tuples, enums and consts, `anyOf`/`oneOf`/`allOf`, `$defs` and recursion, bounded
# and exclusive numbers, string patterns, lengths and formats, nullable and optional
# fields. Strings and numbers are bounded: the grammar guarantees the syntax, not an end,
# and a 135M model left an unbounded integer writes digits until `max_tokens`.
SCHEMA_DIR = Path(__file__).parent / "fixtures" / "schemas"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.json"))
SCHEMAS: list[dict[str, Any]] = [json.loads(f.read_text()) for f in SCHEMA_FILES]

# `format` is checked too (date, email, uuid, ipv4 need no extra package).
VALIDATOR = jsonschema.Draft202012Validator


def validate(text: str, schema: dict[str, Any]) -> None:
    VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER).validate(json.loads(text))


PROMPT = [{"role": "user", "content": "Describe a person as JSON."}]


def run(model: cortex.Model, tok: cortex.Tokenizer, prompt: Any, **kwargs: Any) -> tuple[str, str | None]:
    """The whole text and the finish reason of one streamed generation."""
    text, finish = "", None
    for r in cortex.stream_generate(model, tok, prompt, **kwargs):
        text += r.text
        finish = r.finish_reason
    return text, finish


def test_the_corpus_is_large() -> None:
    assert len(SCHEMAS) >= 30


@pytest.mark.parametrize("seed", [None, 0, 1])
@pytest.mark.parametrize("index", range(len(SCHEMAS)), ids=[f.stem for f in SCHEMA_FILES])
def test_schema_outputs_parse_and_validate(
    smollm: tuple[cortex.Model, cortex.Tokenizer], index: int, seed: int | None
) -> None:
    model, tok = smollm
    schema = SCHEMAS[index]
    sampling: dict[str, Any] = {"temperature": 0.0} if seed is None else {"temperature": 0.8, "seed": seed}
    prompt = [{"role": "user", "content": f"Reply with JSON that follows this schema: {json.dumps(schema)}"}]
    text, finish = run(model, tok, prompt, max_tokens=300, json_schema=schema, **sampling)
    assert finish == "stop", (finish, text)
    validate(text, schema)


def test_a_schema_as_a_string_and_json_object(smollm: tuple[cortex.Model, cortex.Tokenizer]) -> None:
    model, tok = smollm
    as_text = cortex.generate(model, tok, PROMPT, max_tokens=200, json_schema=json.dumps(SCHEMAS[1]))
    as_dict = cortex.generate(model, tok, PROMPT, max_tokens=200, json_schema=SCHEMAS[1])
    assert as_text == as_dict
    # Left greedy without a penalty, the 135M model repeats keys ("family_family_name...")
    # until `max_tokens` on some kernels (the scalar one, and AVX2/AVX-512 since their sums
    # were reordered): whether it ends turns on the last bits of its logits. A repetition
    # penalty, as users of small models set, makes the ending not hinge on them.
    text, finish = run(model, tok, PROMPT, max_tokens=300, json_object=True, repetition_penalty=1.1)
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


def test_regex_and_lark(smollm: tuple[cortex.Model, cortex.Tokenizer]) -> None:
    model, tok = smollm
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
    text, finish = run(model, tok, "Today's date is", max_tokens=30, regex=date)
    assert finish == "stop"
    assert re.fullmatch(date, text), text
    lark = 'start: expr\nexpr: NUM (OP NUM){1,3}\nNUM: /[0-9]{1,3}/\nOP: " + " | " * "\n'
    text, finish = run(
        model, tok, "An arithmetic expression:", max_tokens=40, grammar=lark, seed=3, temperature=0.7
    )
    assert finish == "stop"
    assert re.fullmatch(r"[0-9]{1,3}( [+*] [0-9]{1,3}){1,3}", text), text


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(
    smollm: tuple[cortex.Model, cortex.Tokenizer],
) -> None:
    model, tok = smollm
    engine = cortex.Engine(model, tok, max_batch_size=4)
    prompts = [PROMPT] * 4
    params = [
        # (The penalty: see test_a_schema_as_a_string_and_json_object.)
        cortex.SamplingParams(max_tokens=120, json_schema=SCHEMAS[0], repetition_penalty=1.1),
        cortex.SamplingParams(max_tokens=24),
        cortex.SamplingParams(max_tokens=120, json_schema=SCHEMAS[4], temperature=0.9, seed=5),
        cortex.SamplingParams(max_tokens=30, regex="[a-z]{4,8}"),
    ]
    batch = engine.generate_batch(prompts, params)
    for prompt, p, got in zip(prompts, params, batch, strict=True):
        alone = engine.generate_batch([prompt], p)[0]
        assert got.error is None and alone.error is None
        assert got.token_ids == alone.token_ids
    validate(batch[0].text, SCHEMAS[0])
    validate(batch[2].text, SCHEMAS[4])
    assert engine.stats()["mask_seconds"] > 0
    assert re.fullmatch("[a-z]{4,8}", batch[3].text)


@pytest.mark.parametrize(
    ("kwargs", "param", "compiles"),
    [
        ({"json_schema": {"type": "frob"}}, "json_schema", True),
        ({"json_schema": "{not json"}, "json_schema", False),
        ({"json_schema": [1, 2]}, "json_schema", False),
        ({"regex": "("}, "regex", True),
        ({"grammar": "start: undefined_rule"}, "grammar", True),
        ({"regex": "a" * (256 * 1024 + 1)}, "regex", False),
        ({"json_object": True, "regex": "[0-9]+"}, "regex", False),
    ],
)
def test_bad_constraints_are_errors_naming_their_parameter(
    smollm: tuple[cortex.Model, cortex.Tokenizer], kwargs: dict[str, Any], param: str, compiles: bool
) -> None:
    """What the compiler refuses is a `GrammarError`; what is refused before compiling (not
    JSON, too large, two constraints) a plain `RequestValidationError`."""
    model, tok = smollm
    with pytest.raises(cortex.RequestValidationError) as e:
        cortex.generate(model, tok, "Hi", max_tokens=5, **kwargs)
    assert e.value.param == param, e.value
    assert isinstance(e.value, cortex.GrammarError) == compiles, type(e.value)


def test_settings_round_trip() -> None:
    p = cortex.SamplingParams(json_schema={"type": "object"})
    assert p.json_schema is not None and json.loads(p.json_schema) == {"type": "object"}
    assert (p.json_object, p.regex, p.grammar) == (False, None, None)
    assert "json_schema=" in repr(p)
    assert cortex.SamplingParams(regex="[0-9]+").regex == "[0-9]+"
    assert cortex.SamplingParams(json_object=True).json_object


def test_hostile_constraints_end_in_output_or_a_typed_error(
    smollm: tuple[cortex.Model, cortex.Tokenizer],
) -> None:
    """Grammars built to be expensive stay within llguidance's limits: each either
    constrains the output or fails as a `GrammarError` (each takes under a second here)."""
    model, tok = smollm
    enum = {"enum": [f"value{i}" for i in range(10_000)]}
    text = cortex.generate(model, tok, "Hi", max_tokens=20, temperature=0, json_schema=enum)
    assert json.loads(text) in enum["enum"]
    for regex in ["(a|a)*b", "(a{1000}){1000}", "((a+)+)+c"]:
        text = cortex.generate(model, tok, "Hi", max_tokens=20, temperature=0, regex=regex)
        # (Python's backtracking `re` would take minutes to check these: characters only.)
        assert text and set(text) <= set("abc"), text
    # Nesting past serde_json's depth limit is refused before compiling.
    deep = json.loads('{"type":"object","properties":{"a":' * 100 + '{"type":"integer"}' + "}}" * 100)
    with pytest.raises(cortex.RequestValidationError) as e:
        cortex.generate(model, tok, "Hi", max_tokens=5, json_schema=deep)
    assert e.value.param == "json_schema"
    # 20,000 alternatives in one rule exceed the parser's row limit at the first token.
    huge = "start: " + " | ".join(f'"w{i}"' for i in range(20_000))
    with pytest.raises(cortex.GrammarError) as g:
        cortex.generate(model, tok, "Hi", max_tokens=5, grammar=huge)
    assert g.value.param == "grammar"
