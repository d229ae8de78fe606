"""What prefix caching saves: the time to first token of a follow-up turn in a long chat,
with the engine's prefix cache on and off.

    python benches/prefix_cache.py [--model PATH] [--tokens 2000] [--runs 5]

A conversation of about ``--tokens`` tokens (a system prompt and several user and
assistant turns) is sent and answered (64 tokens, greedy), as a chat client would; then
the follow-up turn (the conversation, that answer, and a new question, rendered by the
chat template) is sent ``--runs`` times with a different question each time, and the time
from submission to its first streamed token is measured. With caching, the follow-up
finds every full block of the conversation in the cache; without, it computes all of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cortex

TOPICS = ["rivers", "bridges", "bread", "clocks", "forests", "ships", "libraries", "glass", "bees", "roads"]


def conversation(tok: cortex.Tokenizer, tokens: int) -> list[dict[str, str]]:
    """A chat of about ``tokens`` tokens, ending with a user turn."""
    messages = [{"role": "system", "content": "You are a patient teacher who answers in plain words."}]
    i = 0
    while True:
        topic = TOPICS[i % len(TOPICS)]
        wonders = (f"I read that {topic} matter in place {i * 10 + j}, and wonder why." for j in range(6))
        question = f"Tell me about {topic}, part {i + 1}. " + " ".join(wonders)
        answer = " ".join(
            f"{topic.capitalize()} shape daily life in many ways; point {j} is that people depend on "
            f"them more than they notice, and history shows it again and again."
            for j in range(6)
        )
        messages.append({"role": "user", "content": question})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert isinstance(ids, list)
        if len(ids) >= tokens:
            return messages
        messages.append({"role": "assistant", "content": answer})
        i += 1


def ttft_ms(engine: cortex.Engine, messages: list[dict[str, str]]) -> float:
    start = time.perf_counter()
    for _ in engine.stream([messages], max_tokens=1, temperature=0.0):
        break
    return (time.perf_counter() - start) * 1e3


def follow_ups(engine: cortex.Engine, chat: list[dict[str, str]], runs: int) -> tuple[list[float], int]:
    """Answers ``chat``, then times ``runs`` follow-up turns; returns their TTFTs (ms) and
    the prompt tokens found in the cache over them."""
    answer = engine.generate_batch([chat], max_tokens=64, temperature=0.0)[0].text
    before = engine.stats()["prefix_cache_hits"]
    times = []
    for r in range(runs):
        question = {"role": "user", "content": f"Thanks! Question {r}: why?"}
        turn = [*chat, {"role": "assistant", "content": answer}, question]
        times.append(ttft_ms(engine, turn))
    time.sleep(0.05)  # let the last stream's request retire before reading the stats
    return times, int(engine.stats()["prefix_cache_hits"] - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--tokens", type=int, default=2000, help="conversation length before the follow-up")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    path = args.model or str(cortex.default_model_path())
    model, tok = cortex.load(path)
    chat = conversation(tok, args.tokens)
    length = len(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    print(f"model: {path}")
    print(f"conversation: {len(chat)} messages, {length} tokens; a follow-up adds its answer and a question")
    results = {}
    for caching in (False, True):
        engine = cortex.Engine(model, tok, prefix_caching=caching)
        ttft_ms(engine, [{"role": "user", "content": "warm up"}])
        times, hits = follow_ups(engine, chat, args.runs)
        results[caching] = statistics.median(times)
        print(
            f"  prefix caching {'on ' if caching else 'off'}: follow-up TTFT p50 {results[caching]:8.1f} ms "
            f"(min {min(times):7.1f}, max {max(times):7.1f}); "
            f"{hits / args.runs:.0f} prompt tokens a turn from the cache"
        )
    print(f"  ratio on/off: {results[True] / results[False]:.3f}x")


if __name__ == "__main__":
    main()
