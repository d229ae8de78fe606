"""Load the default model, stream a chat answer, then look at the logits.

Run: python examples/quickstart.py
"""

import numpy as np

import cortex

model, tokenizer = cortex.load()  # SmolLM2-135M-Instruct, fetched once into ~/.cortex
print(model)

messages = [{"role": "user", "content": "Give me three tips for writing clear Rust code."}]
last = None
for last in cortex.stream_generate(model, tokenizer, messages, max_tokens=120, temperature=0.7, seed=0):
    print(last.text, end="", flush=True)
if last is not None:
    print(
        f"\n\n{last.generation_tokens} tokens at {last.generation_tps:.1f} tok/s "
        f"(prompt {last.prompt_tps:.1f} tok/s), finish: {last.finish_reason}"
    )

ids = tokenizer.encode("The capital of France is")
logits = model.forward(ids)
top = np.argsort(-logits)[:5]
print("next-token candidates:", [(tokenizer.decode([int(t)]), round(float(logits[t]), 2)) for t in top])
