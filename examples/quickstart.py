"""Convert the default model to MLX 4-bit, load the result, and stream an answer.

Run: python examples/quickstart.py
"""

import cortex
from cortex import ConversionConfig, MLXAccelerator, MLXConverter, QuantizationRecipe

# 1. Convert: the SmolLM2-135M-Instruct GGUF (fetched once) to MLX 4-bit groups of 32.
#    A second run finds the conversion in ~/.cortex/mlx_models and reuses it.
source = str(cortex.default_model_path())
config = ConversionConfig(quantization=QuantizationRecipe.SPEED_4BIT, group_size=32)
ok, message, path = MLXConverter().convert_model(source, config=config)
print(message)
if not ok:
    raise SystemExit(1)

# 2. Load the converted folder (weights stay packed in memory).
model, tokenizer = cortex.load(path)
print(model)

# 3. Stream a chat answer through the accelerator's engine.
acc = MLXAccelerator()
messages = [{"role": "user", "content": "Give me three tips for writing clear Rust code."}]
for chunk in acc.generate_optimized(model, tokenizer, messages, max_tokens=120, temperature=0.7):
    print(chunk, end="", flush=True)
print()
stats = acc.engine(model, tokenizer).stats()
print(f"{stats['generation_tokens']} tokens, time to first token {stats['ttft_p50_s']:.2f} s")
