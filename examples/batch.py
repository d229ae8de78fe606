"""Many prompts at once: the engine batches them, every step running all of them through
the model together.

Run: python examples/batch.py
"""

import time

import cortex

model, tokenizer = cortex.load()
engine = cortex.Engine(model, tokenizer, max_batch_size=16)

topics = ["rivers", "volcanoes", "bees", "comets", "glaciers", "deserts", "coral reefs", "owls"]
prompts = [[{"role": "user", "content": f"One sentence about {t}."}] for t in topics]

start = time.perf_counter()
outputs = engine.generate_batch(prompts, max_tokens=48, temperature=0.0)
elapsed = time.perf_counter() - start

for topic, out in zip(topics, outputs):
    print(f"{topic:>12}: {out.text.strip()!r} ({out.generation_tokens} tokens, {out.finish_reason})")
total = sum(o.generation_tokens for o in outputs)
stats = engine.stats()
print(f"\n{total} tokens in {elapsed:.1f} s ({total / elapsed:.1f} tok/s over {len(prompts)} requests)")
print(f"inter-token latency p50 {stats['itl_p50_s'] * 1000:.0f} ms, KV blocks free {stats['kv_blocks_free']}")
