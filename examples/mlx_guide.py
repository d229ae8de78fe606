# %% [markdown]
# # The original MLX Acceleration Guide, run on Cortex
#
# Every code block of the guide of the project Cortex grew from (its
# docs/mlx-acceleration.md), in order and as written. Two changes, both the guide's own
# placeholders: a local model in place of the repo id "microsoft/DialoGPT-medium", and the
# names it leaves undefined (`model`, `tokenizer`, `prompt`, `model1`..`model3`,
# `input_data`) set in the cell before they are used. `dtype=mx.bfloat16` works as
# written where mlx is installed; `dtype="bfloat16"` is the same setting without it.
# tests/test_guide.py runs these cells and checks what each call returns.
#
# One block is not here: the troubleshooting tip `mx.set_default_device(mx.gpu)` only
# talks to mlx (Cortex's device is the CPU, reported by `get_device_info()` below).

# %% The guide's `import mlx.core as mx`: mlx where it is installed; numpy otherwise,
# whose `matmul` the benchmarked operation calls in the same way.
try:
    import mlx.core as mx
except ImportError:
    import numpy as mx  # type: ignore[no-redef]

import cortex

MODEL = str(cortex.default_model_path())  # the guide: "microsoft/DialoGPT-medium"
BFLOAT16 = getattr(mx, "bfloat16", "bfloat16")  # mx.bfloat16 with mlx, else its name

# %% Model Conversion: Converting HuggingFace Models
from cortex.metal.mlx_converter import ConversionConfig, MLXConverter, QuantizationRecipe  # noqa: E402

# Initialize converter
converter = MLXConverter()

# Configure conversion
config = ConversionConfig(
    quantization=QuantizationRecipe.SPEED_4BIT,
    use_amx=True,
    compile_model=True,
    group_size=64,  # Quantization group size
)

# Convert model
success, message, output_path = converter.convert_model(MODEL, config=config)
print(success, message, output_path)

# %% Mixed Precision Configuration
# Custom mixed precision setup
mixed_config = {
    "critical_layers": ["lm_head", "embed_tokens", "wte", "wpe"],
    "critical_bits": 6,  # Higher precision for critical layers
    "standard_bits": 4,  # Standard precision for other layers
}

config = ConversionConfig(
    quantization=QuantizationRecipe.MIXED_PRECISION, mixed_precision_config=mixed_config
)

# %% Chip-Specific Optimization
# Optimize for specific chip
converter.optimize_for_chip(output_path, "m3_pro")

# %% The guide's `model`, `tokenizer` and `prompt`: the converted model.
model, tokenizer = cortex.load(output_path)
prompt = "Tell me about Rust"

# %% Performance Optimization: MLX Accelerator Configuration
from cortex.metal.mlx_accelerator import MLXAccelerator, MLXConfig  # noqa: E402

# Configure acceleration
config = MLXConfig(
    compile_model=True,  # JIT compilation
    use_graph=True,  # Graph optimization
    batch_size=8,  # Inference batch size
    stream_parallel=True,  # Stream parallelism
    use_amx=True,  # AMX coprocessor
    fuse_operations=True,  # Operation fusion
    rotating_kv_cache=True,  # Rotating cache
    kv_cache_size=4096,  # Max cache size
    quantization_bits=4,  # Default quantization
    dtype=BFLOAT16,  # Precision (bfloat16 or float16)
)

# Initialize accelerator
accelerator = MLXAccelerator(config)

# Optimize model
optimized_model = accelerator.optimize_model(model)

# %% Optimization Presets
# Use preset configurations
accelerator = MLXAccelerator(MLXConfig(**MLXAccelerator.OPTIMIZATION_PRESETS["speed"]))

# %% Transformer-Specific Optimizations
# Apply transformer optimizations (12 heads of 64 describe DialoGPT, not this model:
# Cortex runs the model's own layout and a CortexWarning says so)
optimized_model = accelerator.accelerate_transformer(model, num_heads=12, head_dim=64)

# %% Benchmarking: Performance Profiling
# Profile model performance
profile = accelerator.profile_model(
    model,
    input_shape=(1, 512),  # Batch size, sequence length
    num_iterations=100,
)

print(f"Average inference time: {profile['avg_inference_time']:.3f}s")
print(f"Throughput: {profile['throughput']:.1f} samples/s")
print(f"Parameters: {profile['num_parameters']:,}")

# %% Operation Benchmarking
# Benchmark specific operations
# (the guide imports mlx.core as mx here; see the first cell)


def matmul_op(x):
    return mx.matmul(x, x.T)


results = MLXAccelerator.benchmark_operation(
    matmul_op, input_shape=(1024, 1024), num_iterations=1000, use_amx=True
)

print(f"GFLOPS: {results['throughput_gflops']:.1f}")

# %% Memory Management: Optimized Memory Allocation
# Configure memory usage
config = MLXConfig(
    memory_fraction=0.85,  # Use 85% of available memory
    fusion_threshold=1024,  # Minimum size for operation fusion
)

# %% Memory Optimization for Large Models
# Optimize memory for large models
optimized_model = accelerator.optimize_memory(model)

# %% Debugging and Monitoring: Check MLX Device
if hasattr(mx, "default_device"):  # mlx's own device; numpy has none
    # Verify GPU is being used
    device = mx.default_device()
    print(f"Device: {device}")  # Should show Device(gpu, 0)

# Get device info
info = MLXAccelerator.get_device_info()
print(f"Is GPU: {info['is_gpu']}")

# %% Monitor Performance
# Real-time performance monitoring
for token in accelerator.generate_optimized(model, tokenizer, prompt, max_tokens=100, stream=True):
    # Token generation with performance metrics
    print(token, end="", flush=True)
print()

# %% Troubleshooting: Memory errors with large models
# Reduce memory allocation
config = MLXConfig(memory_fraction=0.7)

# %% Advanced Topics: Custom Quantization Predicates


def custom_quantization_predicate(layer_path, layer, model_config):
    """Define custom quantization per layer."""
    if "attention" in layer_path:
        return {"bits": 6, "group_size": 64}
    elif "mlp" in layer_path:
        return {"bits": 4, "group_size": 64}
    else:
        return False  # No quantization


config = ConversionConfig(
    quantization=QuantizationRecipe.MIXED_PRECISION,
    mixed_precision_config={"predicate": custom_quantization_predicate},
)

# %% The guide's `model1`..`model3` and `input_data`: the converted model, the original
# file, and the converted one again; four prompts.
model1 = cortex.load_model(output_path)
model2 = cortex.load_model(MODEL)
model3 = model1
input_data = ["The capital of France is", "Once upon a time", "Rust is a language that", "1, 2, 3,"]

# %% Pipeline Creation
# Create optimized inference pipeline
pipeline = accelerator.create_pipeline([model1, model2, model3], batch_size=4)

# Run pipeline
output = pipeline(input_data)
print(output)

# %% Stream Parallelism
# Enable stream parallelism for concurrent operations
config = MLXConfig(stream_parallel=True, prefetch_size=2)
