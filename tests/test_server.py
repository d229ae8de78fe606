"""``cortex serve``: the OpenAI-compatible HTTP server, checked against its contract
(docs of issue 17: endpoints, request fields, errors, streaming, /metrics, shutdown) with
the official ``openai`` client and raw HTTP on loopback, and against the engine itself:
what the server streams greedily must be what ``cortex.Engine`` generates for the same
prompt. Most tests share one in-process server (``cortex.serve(..., block=False)``); the
command line and SIGTERM run a real ``python -m cortex serve`` subprocess.

Every wait is bounded (client timeouts, deadlines on polls), so a missing or hung server
fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import cortex

SERVING_LINE = re.compile(r"^Serving (?P<name>.+) at (?P<url>http://\S+)/v1")
CLIENT_TIMEOUT = 60.0

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "Name three rivers in Europe."}]

_TOPICS = [
    "the printing press",
    "how rivers shape valleys",
    "why the sky is blue",
    "the rules of chess",
    "sourdough bread",
    "compilers",
    "the life of a star",
    "vaccines",
]


def _topic_prompt(i: int) -> str:
    return f"Request {i}: in one sentence, explain {_TOPICS[i % len(_TOPICS)]}."


# ----------------------------------------------------------------------------- helpers


def _client(base_url: str, api_key: str = "x", timeout: float = CLIENT_TIMEOUT) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)


def _async_client(base_url: str, timeout: float = CLIENT_TIMEOUT) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="x", timeout=timeout, max_retries=0)


def _raw(
    url: str,
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on a fresh connection: (status, lower-cased headers, body)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    data: bytes | None
    if isinstance(body, dict):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _error(status: int, body: bytes) -> dict[str, Any]:
    """The OpenAI error object of a failed response, with every field the contract names."""
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    return dict(err)


def _wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _idle_stats(server: Any, timeout: float = 30.0) -> dict[str, float]:
    """The engine stats once nothing is queued or running."""
    _wait_until(
        lambda: server.stats()["requests_waiting"] + server.stats()["requests_running"] == 0,
        timeout,
        "the server's engine to become idle",
    )
    return dict(server.stats())


def _metrics(url: str) -> dict[str, Any]:
    """/metrics parsed: {"types": {family: type}, "samples": {(name, labels): value}}."""
    status, headers, body = _raw(url, "GET", "/metrics")
    assert status == 200
    assert headers.get("content-type", "").startswith("text/plain"), headers
    types: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return {"types": types, "samples": samples}


def _sample(m: dict[str, Any], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels (0 when absent)."""
    return float(m["samples"].get((name, tuple(sorted(labels.items()))), 0.0))


def _sum(m: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples ``name`` over every label set that includes ``labels``."""
    return float(
        sum(v for (n, ls), v in m["samples"].items() if n == name and set(labels.items()) <= set(ls))
    )


def _greedy(engine: cortex.Engine, prompts: list[Any], max_tokens: int, **kw: Any) -> list[Any]:
    """What the engine itself generates greedily for each prompt (text or chat messages)."""
    return engine.generate_batch(prompts, max_tokens=max_tokens, temperature=0.0, **kw)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(smollm: tuple[cortex.Model, cortex.Tokenizer]) -> Iterator[Any]:
    model, tok = smollm
    srv = cortex.serve(model, tok, port=0, block=False, max_batch_size=64, kv_cache_tokens=32768)
    try:
        yield srv
    finally:
        srv.shutdown(timeout=10)


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[openai.OpenAI]:
    c = _client(server.base_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def engine(smollm: tuple[cortex.Model, cortex.Tokenizer]) -> cortex.Engine:
    """A separate engine on the same model: the reference for greedy outputs (greedy output
    does not depend on the batch it runs in)."""
    model, tok = smollm
    return cortex.Engine(model, tok, max_batch_size=64)


# ----------------------------------------------------------------------------- basics


def test_server_object_health_and_models(server, client):
    assert isinstance(server.port, int) and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.base_url == server.url + "/v1"
    assert isinstance(server.model_name, str) and server.model_name
    assert {"kv_blocks_free", "kv_blocks_total", "requests_waiting", "requests_running"} <= set(
        server.stats()
    )

    status, _, body = _raw(server.url, "GET", "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})

    status, _, body = _raw(server.url, "GET", "/v1/models")
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list"
    (entry,) = listing["data"]
    assert entry["id"] == server.model_name and entry["object"] == "model" and entry["owned_by"] == "cortex"
    assert isinstance(entry["created"], int)
    assert [m.id for m in client.models.list().data] == [server.model_name]


def test_chat_matches_the_engine_streamed_or_not(server, client, engine):
    (ref,) = _greedy(engine, [QUESTION], 24)
    resp = client.chat.completions.create(
        model=server.model_name, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == server.model_name and isinstance(resp.created, int)
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == ref.prompt_tokens
    assert resp.usage.completion_tokens == ref.generation_tokens
    assert resp.usage.total_tokens == ref.prompt_tokens + ref.generation_tokens

    stream = client.chat.completions.create(
        model=server.model_name,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        ref.prompt_tokens,
        ref.generation_tokens,
    )
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref.text
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason] and body[-1].choices[0].finish_reason == ref.finish_reason


def test_completions_match_the_engine_streamed_or_not(server, client, engine, smollm):
    (ref,) = _greedy(engine, [PROMPT], 24)
    resp = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=24, temperature=0)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    (choice,) = resp.choices
    assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
    assert resp.usage is not None and resp.usage.completion_tokens == ref.generation_tokens

    chunks = list(
        client.completions.create(
            model=server.model_name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason

    # The same prompt as token ids, and the model omitted (allowed).
    ids = smollm[1].encode(PROMPT)
    status, _, body = _raw(
        server.url, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 24, "temperature": 0}
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["text"] == ref.text


def test_request_shapes_that_must_work(server, client, engine):
    """Content as a list of text parts, max_completion_tokens, ignore_eos, echo, a list of
    prompts, an omitted model, and unknown fields (ignored)."""
    (ref,) = _greedy(engine, [QUESTION], 12)
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    resp = client.chat.completions.create(
        model=server.model_name, messages=parts, max_completion_tokens=12, temperature=0
    )
    assert resp.choices[0].message.content == ref.text

    status, _, body = _raw(
        server.url,
        "POST",
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "no_such_field": [1, 2]},
    )
    assert status == 200, body
    out = json.loads(body)
    assert out["usage"]["completion_tokens"] == 16 and out["choices"][0]["finish_reason"] == "length"

    echo = client.completions.create(
        model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=0, echo=True
    )
    (short,) = _greedy(engine, [PROMPT], 6)
    assert echo.choices[0].text == PROMPT + short.text

    prompts = [PROMPT, "Once upon a time"]
    refs = _greedy(engine, prompts, 8)
    many = client.completions.create(model=server.model_name, prompt=prompts, max_tokens=8, temperature=0)
    assert sorted(c.index for c in many.choices) == [0, 1]
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [r.text for r in refs]


def test_sse_framing(server):
    """The stream on the wire: text/event-stream, "data: {json}" events separated by blank
    lines, ending with "data: [DONE]"."""
    body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
    status, headers, raw = _raw(server.url, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payloads.append(json.loads(event[len("data: ") :]))
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    first = payloads[0]["choices"][0]["delta"]
    assert (first["role"], first["content"]) == ("assistant", "")
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# ----------------------------------------------------------------------------- sampling


def test_n_choices_use_seed_plus_index(server, client):
    """With n=2 and a seed, choice i samples with seed+i: each choice is what n=1 gives with
    that seed; the prompt is counted once, the completion tokens of both choices add up."""
    kw: dict[str, Any] = {
        "model": server.model_name,
        "messages": QUESTION,
        "max_tokens": 16,
        "temperature": 0.8,
        "extra_body": {"ignore_eos": True},
    }
    both = client.chat.completions.create(n=2, seed=21, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    first = client.chat.completions.create(n=1, seed=21, **kw)
    second = client.chat.completions.create(n=1, seed=22, **kw)
    assert both.choices[0].message.content == first.choices[0].message.content
    assert both.choices[1].message.content == second.choices[0].message.content
    assert both.usage is not None and first.usage is not None
    assert both.usage.prompt_tokens == first.usage.prompt_tokens
    assert both.usage.completion_tokens == 32

    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    for chunk in client.chat.completions.create(n=2, seed=21, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in both.choices]
    assert finishes == ["length", "length"]

    greedy = client.completions.create(
        model=server.model_name, prompt=PROMPT, n=2, max_tokens=12, temperature=0
    )
    assert len(greedy.choices) == 2 and greedy.choices[0].text == greedy.choices[1].text


def test_seeded_sampling_is_reproducible(server, client):
    kw: dict[str, Any] = {"model": server.model_name, "prompt": "Once upon a time", "max_tokens": 24}

    def text(seed: int) -> str:
        return str(client.completions.create(temperature=0.8, seed=seed, **kw).choices[0].text)

    a = text(7)
    assert text(7) == a
    # Sampling really samples: other seeds give other texts (one of three at least).
    assert {text(s) for s in (8, 9, 10)} != {a}
    streamed = client.completions.create(temperature=0.8, seed=7, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == a
    # The default temperature is OpenAI's 1.0, not greedy.
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    defaults = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert defaults != {greedy}


def _straddling_stop(tokens: list[str], offsets: list[int], text: str) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, whose first
    occurrence in ``text`` is at that boundary: (stop, where it starts)."""
    for j in range(2, len(tokens) - 2):
        left, right = tokens[j], tokens[j + 1]
        if len(left.strip()) < 2 or len(right.strip()) < 2 or not (left + right).isascii():
            continue
        stop = left[-2:] + right[:2]
        start = offsets[j + 1] - 2
        if text.find(stop) == start and start > 0:
            return stop, start
    pytest.fail(f"no token boundary to put a stop string on in {tokens!r}")


def test_stop_string_spanning_tokens(server, client):
    """Generate once, put a stop string across a token boundary of the output, and generate
    again: the text ends right before it, with finish_reason "stop" (streamed too)."""
    kw: dict[str, Any] = {
        "model": server.model_name,
        "prompt": PROMPT,
        "max_tokens": 32,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(logprobs=1, **kw).choices[0]
    assert full.logprobs is not None
    tokens, offsets = full.logprobs.tokens, full.logprobs.text_offset
    assert tokens is not None and offsets is not None
    stop, start = _straddling_stop(tokens, offsets, full.text)

    cut = client.completions.create(stop=[stop, "no such stop string"], **kw).choices[0]
    assert (cut.text, cut.finish_reason) == (full.text[:start], "stop")
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.text[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"

    chat_kw: dict[str, Any] = {
        "model": server.model_name,
        "messages": QUESTION,
        "max_tokens": 32,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(logprobs=True, **chat_kw).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content is not None
    content = whole.message.content or ""
    pieces = [t.token for t in whole.logprobs.content]
    assert "".join(pieces) == content
    chat_offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    chat_stop, chat_start = _straddling_stop(pieces, chat_offsets, content)
    stopped = client.chat.completions.create(stop=chat_stop, **chat_kw).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (content[:chat_start], "stop")


def test_chat_logprobs(server, client, smollm):
    model, tok = smollm
    resp = client.chat.completions.create(
        model=server.model_name, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    (choice,) = resp.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    items = choice.logprobs.content
    ref = list(cortex.stream_generate(model, tok, QUESTION, max_tokens=8, temperature=0.0, logprobs=3))
    assert resp.usage is not None and len(items) == resp.usage.completion_tokens == len(ref)
    assert "".join(i.token for i in items) == choice.message.content
    for item, step in zip(items, ref):
        assert step.logprobs is not None
        chosen, top = step.logprobs
        assert item.token == tok.decode([step.token])
        if "\ufffd" not in item.token:
            assert item.bytes == list(item.token.encode("utf-8"))
        assert item.logprob <= 0 and abs(item.logprob - chosen) < 1e-3
        assert len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(abs(v - w) < 1e-3 for v, w in zip(values, sorted((lp for _, lp in top), reverse=True)))
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
        assert all(isinstance(t.bytes, list) for t in item.top_logprobs)

    plain = client.chat.completions.create(
        model=server.model_name, messages=QUESTION, max_tokens=4, temperature=0
    )
    assert plain.choices[0].logprobs is None


def test_completions_logprobs(server, client, smollm):
    model, tok = smollm
    resp = client.completions.create(
        model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    (choice,) = resp.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    ref = list(cortex.stream_generate(model, tok, PROMPT, max_tokens=8, temperature=0.0, logprobs=2))
    n = len(ref)
    assert resp.usage is not None and resp.usage.completion_tokens == n
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, value, top, step in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, ref):
        assert step.logprobs is not None
        assert token == tok.decode([step.token])
        assert abs(value - step.logprobs[0]) < 1e-3
        assert isinstance(top, dict) and len(top) == 2
        assert max(top.values()) == pytest.approx(value, abs=1e-3) and top.get(token) is not None
        ref_top = sorted((v for _, v in step.logprobs[1]), reverse=True)
        assert sorted(top.values(), reverse=True) == pytest.approx(ref_top, abs=1e-3)


# ----------------------------------------------------------------------------- concurrency


async def _stream_text(
    client: openai.AsyncOpenAI,
    model_name: str,
    prompt: Any,
    max_tokens: int,
    close_after: int | None = None,
    ignore_eos: bool = False,
) -> tuple[str, str | None, int]:
    """One streaming request (chat for a list of messages, completions for text):
    (text, finish_reason, chunks read). ``close_after`` closes the response after that
    many chunks, as a client that goes away."""
    kw: dict[str, Any] = {
        "model": model_name,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "extra_body": {"ignore_eos": True} if ignore_eos else None,
    }
    chat = isinstance(prompt, list)
    if chat:
        stream: Any = await client.chat.completions.create(messages=prompt, **kw)
    else:
        stream = await client.completions.create(prompt=prompt, **kw)
    text, finish, n = "", None, 0
    try:
        async for chunk in stream:
            n += 1
            if chunk.choices:
                c = chunk.choices[0]
                text += (c.delta.content or "") if chat else c.text
                finish = c.finish_reason or finish
            if close_after is not None and n >= close_after:
                break
    finally:
        await stream.close()
    return text, finish, n


def _prompts(n: int) -> list[Any]:
    """Half chat messages, half plain text."""
    return [
        [{"role": "user", "content": _topic_prompt(i)}] if i % 2 == 0 else _topic_prompt(i) + " Answer:"
        for i in range(n)
    ]


def test_64_concurrent_streams_match_the_engine(server, engine):
    prompts = _prompts(64)
    refs = _greedy(engine, prompts, 24)

    async def run() -> list[tuple[str, str | None, int]]:
        async with _async_client(server.base_url) as c:
            jobs = [_stream_text(c, server.model_name, p, 24) for p in prompts]
            return list(await asyncio.wait_for(asyncio.gather(*jobs), timeout=150))

    outs = asyncio.run(run())
    for i, ((text, finish, _), ref) in enumerate(zip(outs, refs)):
        assert (text, finish) == (ref.text, ref.finish_reason), f"client {i}"


def test_disconnecting_clients_free_their_cache(server, engine):
    """4 of 40 streaming clients go away after 3 chunks (their requests would run 4000
    tokens): the others stay exact, the 4 are aborted, and the KV cache comes back."""
    baseline = _idle_stats(server)
    assert baseline["kv_blocks_free"] == baseline["kv_blocks_total"]
    prompts = _prompts(40)
    leaving = set(range(3, 40, 10))
    refs = _greedy(engine, prompts, 24)

    async def run() -> list[tuple[str, str | None, int]]:
        async with _async_client(server.base_url) as c:
            jobs = [
                _stream_text(c, server.model_name, p, 4000, close_after=3, ignore_eos=True)
                if i in leaving
                else _stream_text(c, server.model_name, p, 24)
                for i, p in enumerate(prompts)
            ]
            return list(await asyncio.wait_for(asyncio.gather(*jobs), timeout=150))

    outs = asyncio.run(run())
    for i, ((text, finish, n), ref) in enumerate(zip(outs, refs)):
        if i in leaving:
            assert n == 3 and finish is None
        else:
            assert (text, finish) == (ref.text, ref.finish_reason), f"client {i}"
    # Aborted within an engine step of the disconnect; 4000 tokens each would take minutes.
    _wait_until(
        lambda: (
            server.stats()["kv_blocks_free"] == baseline["kv_blocks_free"]
            and server.stats()["requests_running"] == 0
        ),
        15.0,
        "the disconnected requests' KV blocks to come back",
    )
    stats = server.stats()
    assert stats["requests_aborted"] - baseline["requests_aborted"] >= len(leaving)
    metrics = _metrics(server.url)
    assert _sample(metrics, "cortex_kv_cache_blocks_free") == baseline["kv_blocks_free"]
    assert _sample(metrics, "cortex_kv_cache_blocks_total") == baseline["kv_blocks_total"]


# ----------------------------------------------------------------------------- errors


def test_a_waiting_non_streamed_client_that_leaves_is_aborted(server):
    """A client waiting for a whole (non-streamed) response closes its connection: the
    server notices without writing anything, aborts the request within a second and logs it
    as 499, while a request beside it finishes."""
    baseline = _idle_stats(server)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "temperature": 0}).encode()
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body)
        _wait_until(lambda: server.stats()["requests_running"] >= 1, 10.0, "the request to start")
    # 4000 tokens would take minutes; the abort comes within an engine step of the close.
    _wait_until(
        lambda: server.stats()["requests_aborted"] > baseline["requests_aborted"],
        2.0,
        "the abandoned request to be aborted",
    )
    _wait_until(
        lambda: server.stats()["kv_blocks_free"] == baseline["kv_blocks_free"],
        5.0,
        "its KV blocks to come back",
    )
    status, _, _ = _raw(server.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200
    samples = _metrics(server.url)["samples"]
    assert samples[("cortex_requests_total", (("endpoint", "/v1/completions"), ("status", "499")))] >= 1


def test_a_client_that_stops_reading_is_dropped(smollm):
    """A streaming client that reads nothing (RELIABILITY F6): once the server's writes
    have waited `write_timeout`, its connection is closed and its request aborted, so it
    cannot hold a place in the batch; a request beside it is served meanwhile."""
    model, tok = smollm
    server = cortex.serve(model, tok, port=0, block=False, write_timeout=1.0, access_log=False)
    assert server is not None
    try:
        baseline = _idle_stats(server)
        # Large chunks (20 alternatives per token) fill the socket buffers within seconds.
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": PROMPT}],
                # More bytes than any socket buffers hold (about 2.4 KB a token), so the
                # request cannot finish before its writes stall.
                "max_tokens": 7000,
                "ignore_eos": True,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 20,
            }
        ).encode()
        parts = urlsplit(server.url)
        assert parts.hostname is not None and parts.port is not None
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: writes stall
        with s:
            s.connect((parts.hostname, parts.port))
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            s.sendall(head.encode() + body)
            _wait_until(lambda: server.stats()["requests_running"] >= 1, 10.0, "the request to start")
            status, _, _ = _raw(server.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
            assert status == 200
            # 7000 tokens would take minutes: the abort comes once the socket has been full
            # for a second (filling it takes tens of seconds on a loaded 2-core machine).
            _wait_until(
                lambda: server.stats()["requests_aborted"] > baseline["requests_aborted"],
                150.0,
                "the stalled reader's request to be aborted",
            )
        _wait_until(
            lambda: server.stats()["kv_blocks_free"] == baseline["kv_blocks_free"],
            5.0,
            "its KV blocks to come back",
        )
    finally:
        server.shutdown()


def test_malformed_json_is_400(server):
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, _, body = _raw(server.url, "POST", path, b'{"messages": [{"role": "user", "content": "hi"}')
        assert status == 400
        assert _error(status, body)["type"] == "invalid_request_error"
        status, _, body = _raw(server.url, "POST", path, b"[1, 2, 3]")  # JSON, but not an object
        assert status == 400 and _error(status, body)["type"] == "invalid_request_error"


CHAT_BAD = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 65}, "n"),
    ({"stop": 5}, "stop"),
    ({"seed": "abc"}, "seed"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": "hello"}, "messages"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": True},
        "logprobs",
    ),
    ({"modalities": ["text", "audio"]}, "modalities"),
]


@pytest.mark.parametrize(("fields", "param"), CHAT_BAD, ids=[p for _, p in CHAT_BAD])
def test_chat_bad_fields_are_400_naming_the_field(server, fields, param):
    body = {"messages": QUESTION, "max_tokens": 4, **fields}
    status, _, raw = _raw(server.url, "POST", "/v1/chat/completions", body)
    assert status == 400, raw
    err = _error(status, raw)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)


COMPLETIONS_BAD = [
    ({"logprobs": 21}, ("logprobs",)),
    ({"prompt": {"text": "hi"}}, ("prompt",)),
    ({"suffix": "the end"}, ("suffix",)),
    ({"best_of": 3}, ("best_of",)),
    ({"echo": True, "logprobs": 1}, ("echo", "logprobs")),
    ({"logit_bias": {"1": 5}}, ("logit_bias",)),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools",)),
]


@pytest.mark.parametrize(("fields", "params"), COMPLETIONS_BAD, ids=[p[0] for _, p in COMPLETIONS_BAD])
def test_completions_bad_fields_are_400_naming_the_field(server, fields, params):
    body = {"prompt": PROMPT, "max_tokens": 4, **fields}
    status, _, raw = _raw(server.url, "POST", "/v1/completions", body)
    assert status == 400, raw
    err = _error(status, raw)
    assert err["type"] == "invalid_request_error" and err["param"] in params


def test_bad_fields_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model_name, messages=QUESTION, logit_bias={"1": 5})
    assert info.value.status_code == 400 and info.value.param == "logit_bias"
    # What OpenAI allows as "off" is accepted: empty logit_bias, tool_choice "none", text format.
    ok = client.chat.completions.create(
        model=server.model_name,
        messages=QUESTION,
        max_tokens=2,
        logit_bias={},
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert len(ok.choices) == 1


def test_prompt_longer_than_the_context_is_400(server, client):
    long_text = "hello " * 10000  # 10001 tokens; SmolLM2's context is 8192
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_name, prompt=long_text, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": long_text}], max_tokens=4
        )
    assert info.value.code == "context_length_exceeded"
    status, _, raw = _raw(server.url, "POST", "/v1/completions", {"prompt": long_text, "stream": True})
    assert status == 400 and _error(status, raw)["code"] == "context_length_exceeded"


def test_unknown_model_path_and_method(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    assert info.value.code == "model_not_found"
    status, _, raw = _raw(server.url, "POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and _error(status, raw)["code"] == "model_not_found"
    assert _raw(server.url, "GET", "/v1/no/such/path")[0] == 404
    assert _raw(server.url, "GET", "/v1/chat/completions")[0] == 405
    assert _raw(server.url, "POST", "/health", {})[0] == 405


def test_body_over_8_mib_is_413(server):
    filler = 9 * 1024 * 1024
    payload = json.dumps({"prompt": "a" * filler, "max_tokens": 1}).encode()
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()

    def send() -> None:
        # The server may answer before reading the whole body and close: that is fine.
        try:
            sock.sendall(head)
            for i in range(0, len(payload), 1 << 16):
                sock.sendall(payload[i : i + (1 << 16)])
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n" not in received:
            part = sock.recv(4096)
            if not part:
                break
            received += part
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sender.join(30)
        sock.close()
    assert received.startswith(b"HTTP/1.1 413"), received[:200]


# ----------------------------------------------------------------------------- limits and keys


def test_api_key_and_a_model_given_by_path(model_path):
    """The model as a path (loaded by the server), an API key, and the context manager."""
    with cortex.serve(str(model_path), port=0, block=False, api_key="sekrit", kv_cache_tokens=2048) as srv:
        body = {"prompt": PROMPT, "max_tokens": 2}
        status, _, raw = _raw(srv.url, "POST", "/v1/completions", body)
        assert status == 401 and _error(status, raw)["code"] == "invalid_api_key"
        status, _, raw = _raw(
            srv.url, "POST", "/v1/completions", body, headers={"Authorization": "Bearer wrong"}
        )
        assert status == 401 and _error(status, raw)["code"] == "invalid_api_key"
        assert _raw(srv.url, "GET", "/v1/models")[0] == 401
        with _client(srv.base_url, api_key="wrong") as bad, pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model=srv.model_name, prompt=PROMPT, max_tokens=2)
        assert info.value.code == "invalid_api_key"
        with _client(srv.base_url, api_key="sekrit") as good:
            assert (
                len(good.completions.create(model=srv.model_name, prompt=PROMPT, max_tokens=2).choices) == 1
            )
        assert _raw(srv.url, "GET", "/health")[0] == 200
        assert _raw(srv.url, "GET", "/metrics")[0] == 200
        # Other spellings of a protected path, and unknown paths, need the key too.
        for path in ("//v1/models", "/v1//models", "/v1/%6Dodels", "/nowhere"):
            assert _raw(srv.url, "GET", path)[0] == 401, path
        url = srv.url
    # Leaving the with-block shut the server down.
    with pytest.raises(OSError):
        _raw(url, "GET", "/health", timeout=5)


def test_a_reachable_address_needs_a_key_or_insecure(smollm):
    """Listening beyond loopback without an API key is refused, naming the setting, unless
    asked for with insecure=True; loopback needs nothing."""
    model, tok = smollm
    with pytest.raises(cortex.RequestValidationError) as info:
        cortex.serve(model, tok, host="0.0.0.0", port=0, block=False, access_log=False)
    assert info.value.param == "api_key" and "--insecure" in str(info.value)
    for kwargs in ({"insecure": True}, {"api_key": "k"}):
        with cortex.serve(model, tok, host="0.0.0.0", port=0, block=False, access_log=False, **kwargs) as srv:
            assert _raw(f"http://127.0.0.1:{srv.port}", "GET", "/health")[0] == 200


def test_bodies_in_flight_have_a_memory_budget(server):
    """32 clients each declaring an 8 MiB body and sending none of it take the server's
    256 MiB body budget: a 33rd gets 429 at once (memory stays bounded), and once they
    leave, requests are served again."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {8 << 20}\r\n\r\n{{"

    def hold() -> socket.socket:
        s = socket.create_connection((parts.hostname, parts.port), timeout=10)
        s.sendall(head.encode())
        return s

    def answered(s: socket.socket) -> bool:
        """Whether the server has replied (or closed): a holder that arrived while a probe
        held its 1 MiB share was refused, and must take its place again."""
        s.setblocking(False)
        try:
            s.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            s.settimeout(10)

    def budget_taken() -> bool:
        for i, s in enumerate(holders):
            if answered(s):
                s.close()
                holders[i] = hold()
        return _raw(server.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 429

    holders: list[socket.socket] = []
    try:
        holders.extend(hold() for _ in range(32))
        # The holders are reading their bodies once a small request can no longer get in.
        _wait_until(budget_taken, 10.0, "the body budget to be taken", interval=0.1)
        status, headers, raw = _raw(
            server.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}
        )
        assert status == 429 and "retry-after" in headers and "MiB" in _error(status, raw)["message"]
    finally:
        for s in holders:
            s.close()
    _wait_until(
        lambda: _raw(server.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[0] == 200,
        10.0,
        "the budget to come back",
    )


def test_a_body_declared_as_another_type_is_415(server):
    status, _, raw = _raw(
        server.url, "POST", "/v1/completions", "prompt=hi", headers={"Content-Type": "text/plain"}
    )
    assert status == 415 and "application/json" in _error(status, raw)["message"]
    body = {"prompt": PROMPT, "max_tokens": 1}
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert _raw(server.url, "POST", "/v1/completions", body, headers=headers)[0] == 200


def _hold(url: str, n: int = 1) -> http.client.HTTPConnection:
    """Sends a long streaming request and leaves its response unread."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True, "n": n}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    return conn


def test_queue_full_is_429_with_retry_after(smollm):
    """max_batch_size=1, max_queue=1: two sequences may be in flight; a third (or an n=2
    request beside one) gets 429 with Retry-After; once the clients leave, requests work."""
    model, tok = smollm
    with cortex.serve(
        model, tok, port=0, block=False, max_batch_size=1, max_queue=1, kv_cache_tokens=8192
    ) as srv:
        held = [_hold(srv.url)]
        try:
            _wait_until(lambda: srv.stats()["requests_running"] == 1, 20.0, "the first request to run")
            with _client(srv.base_url, timeout=20) as c:
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model=srv.model_name, prompt=PROMPT, max_tokens=2, n=2)
                assert info.value.code == "rate_limit_exceeded"
                held.append(_hold(srv.url))
                deadline = time.monotonic() + 5
                while srv.stats()["requests_waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model=srv.model_name, prompt=PROMPT, max_tokens=2)
                assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
                retry_after = info.value.response.headers.get("retry-after")
                assert retry_after is not None and retry_after.strip().isdigit(), retry_after
                status, headers, raw = _raw(srv.url, "POST", "/v1/chat/completions", {"messages": QUESTION})
                assert status == 429 and "retry-after" in headers
                assert _error(status, raw)["code"] == "rate_limit_exceeded"
        finally:
            for conn in held:
                conn.close()
        _wait_until(
            lambda: (
                srv.stats()["requests_running"] + srv.stats()["requests_waiting"] == 0
                and srv.stats()["kv_blocks_free"] == srv.stats()["kv_blocks_total"]
            ),
            20.0,
            "the held requests to be aborted",
        )
        with _client(srv.base_url) as c:
            assert c.completions.create(model=srv.model_name, prompt=PROMPT, max_tokens=2).choices


# ----------------------------------------------------------------------------- /metrics


def test_metrics(server, client):
    chat = "/v1/chat/completions"
    before = _metrics(server.url)
    resp = client.chat.completions.create(
        model=server.model_name, messages=QUESTION, max_tokens=6, temperature=0
    )
    assert resp.usage is not None
    status, _, _ = _raw(server.url, "POST", chat, {"messages": QUESTION, "temperature": "hot"})
    assert status == 400
    after = _metrics(server.url)

    types = after["types"]
    assert types["cortex_requests"] == "counter"
    assert types["cortex_prompt_tokens"] == types["cortex_generation_tokens"] == "counter"
    assert types["cortex_preemptions"] == "counter"
    for gauge in (
        "cortex_requests_waiting",
        "cortex_requests_running",
        "cortex_kv_cache_usage_ratio",
        "cortex_kv_cache_blocks_free",
        "cortex_kv_cache_blocks_total",
        "cortex_kv_cache_window_blocks_free",
        "cortex_kv_cache_window_blocks_total",
    ):
        assert types[gauge] == "gauge", gauge

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert delta("cortex_requests_total", endpoint=chat, status="200") == 1
    assert delta("cortex_requests_total", endpoint=chat, status="400") == 1
    assert delta("cortex_prompt_tokens_total") == resp.usage.prompt_tokens
    assert delta("cortex_generation_tokens_total") == resp.usage.completion_tokens

    for hist in (
        "cortex_time_to_first_token_seconds",
        "cortex_inter_token_latency_seconds",
        "cortex_request_duration_seconds",
    ):
        assert types[hist] == "histogram", hist
        les = {dict(ls)["le"] for (n, ls) in after["samples"] if n == hist + "_bucket"}
        assert "+Inf" in les and len(les) > 2, hist
        buckets = sorted((float(le), _sum(after, hist + "_bucket", le=le)) for le in les)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), hist  # cumulative
        assert buckets[-1][1] == _sum(after, hist + "_count") and _sum(after, hist + "_sum") >= 0
    assert delta("cortex_time_to_first_token_seconds_count") >= 1
    assert delta("cortex_request_duration_seconds_count") >= 1
    assert delta("cortex_inter_token_latency_seconds_count") >= resp.usage.completion_tokens - 1

    assert 0.0 <= _sample(after, "cortex_kv_cache_usage_ratio") <= 1.0
    total = _sample(after, "cortex_kv_cache_blocks_total")
    assert (
        total == server.stats()["kv_blocks_total"]
        and 0 <= _sample(after, "cortex_kv_cache_blocks_free") <= total
    )


# ----------------------------------------------------------------------------- command line


class _Cli:
    """``python -m cortex serve ...`` as a subprocess; stderr is read line by line on a
    thread (progress bars' carriage returns split lines too)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cortex", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            for piece in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                self.log.append(piece)
                self.lines.put(piece)

    def wait_serving(self, timeout: float = 120.0) -> tuple[str, str]:
        """(served name, base url without /v1) from the "Serving NAME at URL/v1" line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = SERVING_LINE.match(line)
            if m:
                return m["name"], m["url"]
        pytest.fail("no 'Serving ... at URL/v1' line; stderr:\n" + "\n".join(self.log[-40:]))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
            self._reader.join(10)  # the last log lines
            return rc
        except subprocess.TimeoutExpired:
            pytest.fail(f"cortex serve did not exit within {timeout}s; stderr:\n" + "\n".join(self.log[-40:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _refused_or_503(url: str) -> bool:
    """A new connection while draining is refused or answered 503."""
    try:
        status, _, _ = _raw(url, "GET", "/health", timeout=5)
    except OSError:
        return True
    return status == 503


def test_cli_sigterm_lets_a_running_stream_finish(model_path, engine):
    n_tokens = 256
    (ref,) = _greedy(engine, [PROMPT], n_tokens, ignore_eos=True)
    cli = _Cli(
        "--model", str(model_path), "--port", "0", "--served-model-name", "smol-cli",
        "--max-batch-size", "4", "--kv-cache-tokens", "4096",
    )  # fmt: skip
    try:
        name, url = cli.wait_serving()
        assert name == "smol-cli"
        with _client(url + "/v1") as c:
            assert [m.id for m in c.models.list().data] == ["smol-cli"]
            stream = c.completions.create(
                model="smol-cli", prompt=PROMPT, max_tokens=n_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = iter(stream)
            text = next(chunks).choices[0].text
            cli.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert cli.proc.poll() is None, "exited before its running request finished"
            assert _refused_or_503(url)
            rest = list(chunks)
            assert rest, "the stream ended before the check for new connections"
            text += "".join(ch.choices[0].text for ch in rest)
            assert (text, rest[-1].choices[0].finish_reason) == (ref.text, "length")
        assert cli.wait(60) == 0
        log = "\n".join(cli.log)
        # One log line per request: "POST /v1/completions 200 prompt=N completion=M 0.123s".
        logged = rf"POST /v1/completions 200 prompt={ref.prompt_tokens} completion={n_tokens} \d+(\.\d+)?s"
        assert re.search(logged, log), log
        assert re.search(r"GET /v1/models 200 ", log), log
    finally:
        cli.close()


def test_cli_shutdown_timeout_aborts_and_env_api_key(model_path):
    """--shutdown-timeout 1: a stream that would run 4000 tokens ends (finish_reason
    "abort", or cut) soon after SIGTERM and the process still exits 0. The API key comes
    from CORTEX_API_KEY."""
    cli = _Cli(
        "--model", str(model_path), "--port", "0", "--shutdown-timeout", "1", "--kv-cache-tokens", "8192",
        env={"CORTEX_API_KEY": "from-env"},
    )  # fmt: skip
    try:
        _, url = cli.wait_serving()
        assert _raw(url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 401
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            body = {
                "prompt": PROMPT,
                "max_tokens": 4000,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            headers = {"Content-Type": "application/json", "Authorization": "Bearer from-env"}
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200
            received, finish, done = 0, None, False
            signalled = None
            try:
                for line in iter(resp.readline, b""):
                    if not line.startswith(b"data: "):
                        continue
                    if line.strip() == b"data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[len(b"data: ") :])
                    received += 1
                    finish = chunk["choices"][0]["finish_reason"] or finish
                    if received == 3:
                        cli.proc.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
            except (OSError, http.client.HTTPException):
                pass  # a cut stream is allowed ("... or are cut")
            assert signalled is not None, "the stream ended before SIGTERM"
            ended = time.monotonic() - signalled
        finally:
            conn.close()
        # Either the choice ends with finish_reason "abort" (then [DONE]), or the stream is cut
        # (no [DONE]); a stream that says [DONE] without a finish_reason is neither.
        assert finish == "abort" if done else finish in (None, "abort"), (finish, done)
        assert received < 4000 and ended < 15, (received, ended)
        assert cli.wait(30) == 0
    finally:
        cli.close()
