"""Structured output and tool calls through ``cortex serve``, with the official ``openai``
client on loopback and the default model (SmolLM2-135M-Instruct, whose chat template knows
no tools: the server describes them in a system message and reads Hermes-style
``<tool_call>`` blocks back). Outputs are checked with the ``jsonschema`` package, streamed
deltas against the whole response, and errors by their status and ``param``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

import cortex

CLIENT_TIMEOUT = 120.0

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}

TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(smollm: tuple[cortex.Model, cortex.Tokenizer]) -> Iterator[Any]:
    model, tok = smollm
    srv = cortex.serve(model, tok, port=0, block=False, max_batch_size=16)
    try:
        yield srv
    finally:
        srv.shutdown(timeout=10)


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.base_url, api_key="x", timeout=CLIENT_TIMEOUT, max_retries=0)
    try:
        yield c
    finally:
        c.close()


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, parsed arguments) of each call, its arguments validated against the tool."""
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


def test_response_format_json_object_and_schema(server: Any, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
        # Greedy JSON without a penalty can repeat keys until max_tokens: see
        # tests/test_structured.py::test_a_schema_as_a_string_and_json_object.
        extra_body={"repetition_penalty": 1.1},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (None, 1, 2):
        kw: dict[str, Any] = {"temperature": 0} if seed is None else {"temperature": 0.9, "seed": seed}
        r = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            max_tokens=200,
            response_format=fmt,
            **kw,
        )
        assert r.choices[0].finish_reason == "stop", r
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)
    # Streamed greedily, the deltas make the same document; completions take it too.
    greedy: dict[str, Any] = {
        "model": server.model_name,
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": 200,
        "temperature": 0,
        "response_format": fmt,
    }
    stream = client.chat.completions.create(stream=True, **greedy)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    again = client.chat.completions.create(**greedy)
    assert streamed == again.choices[0].message.content
    c = client.completions.create(
        model=server.model_name,
        prompt="A person as JSON:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": fmt},
    )
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


def _schema_format(spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": spec}


SCHEMA_PARAM = "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        (_schema_format({"name": "x", "schema": {"type": "frob"}}), SCHEMA_PARAM),
        (_schema_format({"name": "x", "schema": {"pattern": "("}}), SCHEMA_PARAM),
        (_schema_format({"name": "x"}), SCHEMA_PARAM),
        (_schema_format({"name": "no spaces", "schema": {}}), "response_format.json_schema.name"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_it(
    server: Any, client: openai.OpenAI, fmt: Any, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model_name, messages=ASK_WEATHER, max_tokens=5, response_format=fmt
        )
    assert info.value.status_code == 400 and info.value.param == param, info.value


def test_required_and_named_tool_choice_give_valid_calls(server: Any, client: openai.OpenAI) -> None:
    for seed in (None, 0, 1):
        kw: dict[str, Any] = {"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed}
        r = client.chat.completions.create(
            model=server.model_name,
            messages=ASK_WEATHER,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=300,
            **kw,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(_calls(choice.message)) >= 1
        assert choice.message.content is None
    r = client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "What is 12 plus 30?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=200,
        temperature=0,
    )
    calls = _calls(r.choices[0].message)
    assert r.choices[0].finish_reason == "tool_calls"
    assert [name for name, _ in calls] == ["add"]
    r = client.chat.completions.create(
        model=server.model_name,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        temperature=0.8,
        seed=4,
    )
    assert len(_calls(r.choices[0].message)) == 1


def test_streamed_tool_call_deltas_make_the_whole_message(server: Any, client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": server.model_name,
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 300,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict[str, str]] = {}
    fragments: dict[int, int] = {}
    finish = None
    content = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            assert d.function is not None
            # As OpenAI streams them: the id and name open the call, arguments follow.
            if d.index not in calls:
                assert d.id and d.function.name and d.function.arguments == "", d
            else:
                assert d.id is None and d.function.name is None, d
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += d.id or ""
            c["name"] += d.function.name or ""
            c["arguments"] += d.function.arguments or ""
            fragments[d.index] = fragments.get(d.index, 0) + 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert all(n > 3 for n in fragments.values()), fragments
    assert whole.message.tool_calls is not None
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(calls[k]["name"], calls[k]["arguments"]) for k in sorted(calls)] == want
    assert all(calls[k]["id"].startswith("call_") for k in calls)


def test_a_tool_result_round_trips_to_an_answer(server: Any, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=server.model_name,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    message = first.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    history: list[Any] = [
        *ASK_WEATHER,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})},
    ]
    answer = client.chat.completions.create(
        model=server.model_name,
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    choice = answer.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length") and (choice.message.content or "").strip()
    # Under `auto` the model may answer or call again; either way the message is well formed.
    auto = client.chat.completions.create(
        model=server.model_name, messages=history, tools=TOOLS, max_tokens=120, temperature=0
    )
    choice = auto.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _calls(choice.message)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_bad_tool_requests_are_400_naming_the_field(server: Any, client: openai.OpenAI) -> None:
    for kw, param in [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=server.model_name, messages=ASK_WEATHER, max_tokens=5, **kw)
        assert info.value.param == param, info.value
