"""Writes the Llama-3.2-1B-shaped benchmark model of issue 22 as an f16 GGUF: random
weights (normal, std 0.02; norms 1), vocab 49152, hidden 2048, 16 layers, 32 query and 8
KV heads, FFN 8192, RoPE base 500000, tied embeddings. ``../shared/cpu16/mk1b.py`` makes
the same shape with torch and transformers; this needs only numpy and the ``gguf``
package (a dev dependency), and takes its tokenizer from any Llama-family GGUF (the
default model's, SmolLM2's, unless ``--tokenizer`` names another).

    python benches/make_1b_gguf.py OUT.gguf [--tokenizer GGUF] [--seed 0]

Quantize it with ``llama-quantize OUT.gguf q41.gguf Q4_1`` (llama.cpp's mix: Q6_K head)
or into an all-Q4_1 file with Cortex::

    MLXConverter().convert_model("OUT.gguf", "q41", config=ConversionConfig(
        quantization=QuantizationRecipe.SPEED_4BIT, group_size=32, output_format="gguf"))
"""

from __future__ import annotations

import argparse
import sys

import gguf
import numpy as np

import cortex

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 32, 8, 49152
HEAD_DIM = HIDDEN // HEADS


def copy_tokenizer(src: gguf.GGUFReader, out: gguf.GGUFWriter) -> None:
    """Every ``tokenizer.*`` field of ``src``, with its type."""
    for name, field in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if field.types[1] == gguf.GGUFValueType.STRING:
                out.add_array(name, [bytes(field.parts[i]).decode("utf-8") for i in field.data])
            else:
                out.add_array(name, [field.parts[i].tolist()[0] for i in field.data])
        elif kind == gguf.GGUFValueType.STRING:
            out.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            out.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .gguf file to write (~2.1 GB)")
    p.add_argument("--tokenizer", default=None, help="a GGUF whose tokenizer (vocab 49152) to copy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    source = gguf.GGUFReader(str(args.tokenizer or cortex.default_model_path()))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    if vocab != VOCAB:
        print(f"the tokenizer has {vocab} tokens, the benchmark shape {VOCAB}", file=sys.stderr)
        return 2
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_context_length(8192)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    copy_tokenizer(source, w)
    rng = np.random.default_rng(args.seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(HIDDEN, dtype=np.float32)

    w.add_tensor("token_embd.weight", weight(VOCAB, HIDDEN))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm())
        w.add_tensor(b + "attn_q.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "attn_k.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_v.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_output.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "ffn_norm.weight", norm())
        w.add_tensor(b + "ffn_gate.weight", weight(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", weight(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", weight(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", norm())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
