"""``cortex serve`` under load, in one run: aggregate generated tok/s through HTTP at 16 and
64 concurrent streaming clients against the engine alone at the same concurrency, the
time-to-first-token that HTTP adds to one request, and llama.cpp's server beside it.

    python benches/server_load.py [--model PATH] [--gen-tokens 64]
        [--llama-python /work/benchvenv/bin/python] [--ttft-samples 20]

The server runs in this process (``cortex.serve(..., block=False, port=0)``) on loopback;
the clients are ``openai.AsyncOpenAI`` streams, each with its own chat prompt, greedy,
ignoring end-of-sequence. "Aggregate tok/s" is the same for every row: generated tokens
over the wall time from the first submit to the last token. The engine rows run the same
prompts and settings through ``cortex.Engine.generate_batch`` with the server's batch size and
cache size, so the ratio is what the HTTP layer (and the Python client sharing the CPU
with the server) costs. TTFT is measured to the first streamed text, sequentially, as
the median of ``--ttft-samples`` requests each way. Every HTTP figure is taken twice: with
the official ``openai`` SDK, and with a bare asyncio HTTP/1.1 client that only splits the
event stream; on a small machine the SDK's own Python (request building, one pydantic model
per chunk) competes with the engine for the same cores, and the difference shows what is
the client's and what is the server's.

llama.cpp runs as ``python -m llama_cpp.server`` (llama-cpp-python's OpenAI-compatible
server, which lives in a separate benchmark venv, never in CI) with the interpreter given
by ``--llama-python``, on the same GGUF file with the same thread count, and gets the same
client code at 16 clients; end-of-sequence is masked with ``logit_bias`` there (it has no
``ignore_eos``). Without ``--llama-python`` that row is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import openai
from engine_throughput import _messages  # the same prompts as the engine benchmark

import cortex

_TIMEOUT = 600.0  # seconds; every phase is bounded by it


@dataclass
class Load:
    clients: int
    tokens: int
    seconds: float

    @property
    def tps(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------- HTTP side


async def _one_stream(
    client: openai.AsyncOpenAI, model: str, messages: Any, n_gen: int, extra: dict[str, Any]
) -> tuple[int, float]:
    """One streaming chat request: (generated tokens, time of its last token)."""
    stream: Any = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=n_gen, temperature=0, stream=True, **extra
    )
    chunks, usage, last = 0, None, time.perf_counter()
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                last = time.perf_counter()
    finally:
        await stream.close()
    return (usage if usage is not None else chunks), last


async def _http_load(base_url: str, model: str, clients: int, n_gen: int, extra: dict[str, Any]) -> Load:
    prompts = _messages(clients)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", timeout=_TIMEOUT, max_retries=0) as c:
        await _one_stream(c, model, prompts[0], 4, extra)  # warm-up: connection, first pass
        start = time.perf_counter()
        jobs = [_one_stream(c, model, m, n_gen, extra) for m in prompts]
        results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=_TIMEOUT)
    return Load(clients, sum(n for n, _ in results), max(t for _, t in results) - start)


async def _http_ttft(base_url: str, model: str, samples: int, extra: dict[str, Any]) -> list[float]:
    messages: Any = _messages(1)[0]
    out = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", timeout=_TIMEOUT, max_retries=0) as c:
        for _ in range(samples + 1):  # the first is a warm-up
            start = time.perf_counter()
            stream: Any = await c.chat.completions.create(
                model=model, messages=messages, max_tokens=8, temperature=0, stream=True, **extra
            )
            try:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        out.append(time.perf_counter() - start)
                        break
            finally:
                await stream.close()  # leaving early aborts the rest of the request
    return out[1:]


async def _raw_stream(
    port: int, model: str, messages: Any, n_gen: int, first_only: bool = False
) -> tuple[int, float]:
    """The same request as `_one_stream` over a bare HTTP/1.1 connection (asyncio streams, no
    SDK): what the server costs without the Python client's own parsing. Returns (content
    chunks, time of the last one, or of the first with `first_only`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {"model": model, "messages": messages, "max_tokens": n_gen, "temperature": 0, "stream": True,
         "ignore_eos": True}
    ).encode()  # fmt: skip
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    chunks, last = 0, time.perf_counter()
    try:
        while line := await reader.readline():
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    chunks += 1
                    last = time.perf_counter()
                    if first_only:
                        break
    finally:
        writer.close()
    return chunks, last


async def _raw_load(port: int, model: str, clients: int, n_gen: int) -> Load:
    prompts = _messages(clients)
    await _raw_stream(port, model, prompts[0], 4)  # warm-up
    start = time.perf_counter()
    jobs = [_raw_stream(port, model, m, n_gen) for m in prompts]
    results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=_TIMEOUT)
    return Load(clients, sum(n for n, _ in results), max(t for _, t in results) - start)


async def _raw_ttft(port: int, model: str, samples: int) -> list[float]:
    messages: Any = _messages(1)[0]
    out = []
    for _ in range(samples + 1):  # the first is a warm-up
        start = time.perf_counter()
        _, first = await _raw_stream(port, model, messages, 8, first_only=True)
        out.append(first - start)
    return out[1:]


# ----------------------------------------------------------------------------- engine side


def _engine_load(engine: cortex.Engine, clients: int, n_gen: int) -> Load:
    prompts = _messages(clients)
    engine.generate_batch(prompts[:1], max_tokens=4, temperature=0.0)  # warm-up
    start = time.perf_counter()
    done = engine.generate_batch(prompts, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
    return Load(clients, sum(r.generation_tokens for r in done), time.perf_counter() - start)


def _engine_ttft(engine: cortex.Engine, samples: int) -> list[float]:
    prompts = _messages(1)
    out = []
    for _ in range(samples + 1):
        start = time.perf_counter()
        for event in engine.stream(prompts, max_tokens=8, temperature=0.0):
            if event.text:
                out.append(time.perf_counter() - start)
                break  # leaving the loop aborts the request
    return out[1:]


# ----------------------------------------------------------------------------- llama.cpp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _llama_server_load(
    llama_python: str, path: str, threads: int, clients: int, n_gen: int, eos_ids: list[int]
) -> Load | str:
    """Aggregate tok/s of llama-cpp-python's server, or why it was skipped."""
    if not os.path.exists(llama_python):
        return f"skipped: {llama_python} does not exist"
    probe = subprocess.run([llama_python, "-c", "import llama_cpp.server"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"skipped: {llama_python} cannot import llama_cpp.server"
    port = _free_port()
    cmd = [
        llama_python, "-m", "llama_cpp.server", "--model", path, "--n_threads", str(threads),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
        "--interrupt_requests", "False",  # else each new request cuts the running stream short
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    return f"skipped: llama_cpp.server exited with {proc.returncode}"
                try:
                    with urllib.request.urlopen(base + "/models", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    return "skipped: llama_cpp.server did not come up within 180 s"
                time.sleep(0.5)
            model = _served_model(base)
            extra = {"logit_bias": {str(t): -100 for t in eos_ids}}  # its stand-in for ignore_eos
            return asyncio.run(_http_load(base, model, clients, n_gen, extra))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def _served_model(base_url: str) -> str:
    with openai.OpenAI(base_url=base_url, api_key="x", timeout=30, max_retries=0) as c:
        return c.models.list().data[0].id


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file (default model if omitted)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ttft-samples", type=int, default=40)
    p.add_argument("--llama-python", default=None, help="interpreter with llama-cpp-python[server] installed")
    p.add_argument("--llama-clients", type=int, default=16)
    args = p.parse_args()

    path = str(args.model or cortex.default_model_path())
    model, tok = cortex.load(path)
    threads = int(os.environ.get("CORTEX_NUM_THREADS") or os.cpu_count() or 1)
    batch = max(args.concurrency)
    # Room for every client's prompt and output at the highest concurrency, for both sides.
    prompt_len = max(
        len(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)) for m in _messages(batch)
    )
    kv_tokens = batch * (prompt_len + args.gen_tokens + 16)
    print(f"model: {path}\nthreads: {threads}, tokens per request: {args.gen_tokens}, batch {batch}, "
          f"KV cache {kv_tokens} tokens\n")  # fmt: skip

    engine = cortex.Engine(model, tok, max_batch_size=batch, kv_cache_tokens=kv_tokens)
    ignore_eos = {"extra_body": {"ignore_eos": True}}
    rows: list[tuple[Load, Load, Load]] = []
    with cortex.serve(
        model, tok, port=0, block=False, max_batch_size=batch, kv_cache_tokens=kv_tokens, access_log=False
    ) as srv:
        for clients in args.concurrency:
            direct = _engine_load(engine, clients, args.gen_tokens)
            http = asyncio.run(_http_load(srv.base_url, srv.model_name, clients, args.gen_tokens, ignore_eos))
            raw = asyncio.run(_raw_load(srv.port, srv.model_name, clients, args.gen_tokens))
            rows.append((http, raw, direct))
        # Interleaved in rounds of a few samples each way, so that the machine's drift
        # touches all three alike.
        ttft_engine, ttft_http, ttft_raw = [], [], []
        for _ in range(max(1, args.ttft_samples // 5)):
            ttft_engine += _engine_ttft(engine, 5)
            ttft_http += asyncio.run(_http_ttft(srv.base_url, srv.model_name, 5, {}))
            ttft_raw += asyncio.run(_raw_ttft(srv.port, srv.model_name, 5))

    llama: Load | str = "skipped (pass --llama-python with llama-cpp-python[server] installed)"
    if args.llama_python:
        llama = _llama_server_load(
            args.llama_python, path, threads, args.llama_clients, args.gen_tokens, tok.eos_token_ids
        )

    print(
        "aggregate tok/s: engine (generate_batch), through HTTP with the openai SDK, and with a bare client"
    )
    print(f"{'clients':>7} {'engine':>8} {'openai':>8} {'ratio':>6} {'bare':>8} {'ratio':>6} {'tokens':>7}")
    for http, raw, direct in rows:
        print(f"{http.clients:>7} {direct.tps:>8.1f} {http.tps:>8.1f} {http.tps / direct.tps:>5.2f}x "
              f"{raw.tps:>8.1f} {raw.tps / direct.tps:>5.2f}x {http.tokens:>7}")  # fmt: skip
    e = statistics.median(ttft_engine)
    print(f"\nTTFT median over {len(ttft_engine)}: engine {e * 1000:.1f} ms")
    for name, samples in (("openai SDK", ttft_http), ("bare client", ttft_raw)):
        h = statistics.median(samples)
        print(f"  HTTP, {name}: {h * 1000:.1f} ms, adds {(h - e) * 1000:+.1f} ms")
    if isinstance(llama, Load):
        same = next((http for http, _, _ in rows if http.clients == llama.clients), None)
        ratio = f"{same.tps / llama.tps:.2f}x" if same else "-"
        print(f"\nllama.cpp server, {llama.clients} clients: {llama.tps:.1f} tok/s ({llama.tokens} tokens); "
              f"Cortex/llama.cpp: {ratio}")  # fmt: skip
    else:
        print(f"\nllama.cpp server: {llama}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
