"""A small GGUF writer for tests: valid tiny models, and files broken on purpose.

Written from the GGUF specification (ggml docs/gguf.md); shares no code with the Rust
reader it tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
           U64: "Q", I64: "q", F64: "d"}  # fmt: skip
GGML_F32 = 0


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(ty: int, v: Any) -> bytes:
    if ty == STRING:
        return string(v)
    if ty == ARRAY:
        elem_ty, items = v
        if isinstance(items, np.ndarray):  # large numeric arrays, written in one piece
            raw = items.astype("<" + _SCALAR[elem_ty]).tobytes()
            return struct.pack("<IQ", elem_ty, len(items)) + raw
        return struct.pack("<IQ", elem_ty, len(items)) + b"".join(value(elem_ty, x) for x in items)
    return struct.pack("<" + _SCALAR[ty], v)


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: fastest-varying first
    data: bytes = b""
    ggml_type: int = GGML_F32
    offset: int | None = None  # None: laid out after the previous tensor


@dataclass
class Gguf:
    kvs: list[tuple[str, int, Any]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    alignment: int = 32
    tensor_count: int | None = None
    kv_count: int | None = None
    #: The weights as numpy arrays (numpy order: slowest dimension first), for references.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        out = bytearray(self.magic + struct.pack("<I", self.version))
        out += struct.pack("<QQ", len(self.tensors) if self.tensor_count is None else self.tensor_count,
                           len(self.kvs) if self.kv_count is None else self.kv_count)  # fmt: skip
        for key, ty, v in self.kvs:
            out += string(key) + struct.pack("<I", ty) + value(ty, v)
        data = bytearray()
        for t in self.tensors:
            offset = len(data) if t.offset is None else t.offset
            out += string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.ggml_type, offset)
            data += t.data
            data += b"\0" * (-len(data) % self.alignment)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out + data)

    def write(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())


def tiny_llama(seed: int = 0, vocab: int = 16, hidden: int = 8, heads: int = 2, kv_heads: int = 1,
               ff: int = 16, layers: int = 1, ctx: int = 32) -> Gguf:  # fmt: skip
    """A valid llama-architecture GGUF with random f32 weights (no tokenizer)."""
    rng = np.random.default_rng(seed)
    hd = hidden // heads

    arrays: dict[str, np.ndarray] = {}

    def t(name: str, *shape: int) -> Tensor:
        # `shape` is numpy order (slowest first); GGUF lists dims fastest first.
        arr = rng.standard_normal(shape).astype("<f4") * 0.5
        arrays[name] = arr
        return Tensor(name, list(reversed(shape)), arr.tobytes())

    tensors = [t("token_embd.weight", vocab, hidden)]
    for i in range(layers):
        tensors += [
            t(f"blk.{i}.attn_norm.weight", hidden),
            t(f"blk.{i}.attn_q.weight", heads * hd, hidden),
            t(f"blk.{i}.attn_k.weight", kv_heads * hd, hidden),
            t(f"blk.{i}.attn_v.weight", kv_heads * hd, hidden),
            t(f"blk.{i}.attn_output.weight", hidden, heads * hd),
            t(f"blk.{i}.ffn_norm.weight", hidden),
            t(f"blk.{i}.ffn_gate.weight", ff, hidden),
            t(f"blk.{i}.ffn_up.weight", ff, hidden),
            t(f"blk.{i}.ffn_down.weight", hidden, ff),
        ]
    tensors.append(t("output_norm.weight", hidden))
    kvs = [
        ("general.architecture", STRING, "llama"),
        ("llama.block_count", U32, layers),
        ("llama.context_length", U32, ctx),
        ("llama.embedding_length", U32, hidden),
        ("llama.feed_forward_length", U32, ff),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, kv_heads),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.vocab_size", U32, vocab),
    ]
    return Gguf(kvs=kvs, tensors=tensors, arrays=arrays)


def tiny_gemma3(seed: int = 0, window: int = 4, layers: int = 1, vocab: int = 16, hidden: int = 8,
                heads: int = 2, head_dim: int = 4, ff: int = 16, ctx: int = 64) -> Gguf:  # fmt: skip
    """A valid gemma3-architecture GGUF with random f32 weights: q/k norms, sandwich norms,
    sliding-window attention over `window` positions (every 6th layer global)."""
    rng = np.random.default_rng(seed)

    arrays: dict[str, np.ndarray] = {}

    def t(name: str, *shape: int, scale: float = 0.5, offset: float = 0.0) -> Tensor:
        arr = (rng.standard_normal(shape) * scale + offset).astype("<f4")
        arrays[name] = arr
        return Tensor(name, list(reversed(shape)), arr.tobytes())

    tensors = [t("token_embd.weight", vocab, hidden)]
    for i in range(layers):
        tensors += [
            t(f"blk.{i}.attn_norm.weight", hidden, scale=0.1, offset=1.0),
            t(f"blk.{i}.attn_q.weight", heads * head_dim, hidden),
            t(f"blk.{i}.attn_k.weight", head_dim, hidden),
            t(f"blk.{i}.attn_v.weight", head_dim, hidden),
            t(f"blk.{i}.attn_q_norm.weight", head_dim, scale=0.1, offset=1.0),
            t(f"blk.{i}.attn_k_norm.weight", head_dim, scale=0.1, offset=1.0),
            t(f"blk.{i}.attn_output.weight", hidden, heads * head_dim),
            t(f"blk.{i}.post_attention_norm.weight", hidden, scale=0.1, offset=1.0),
            t(f"blk.{i}.ffn_norm.weight", hidden, scale=0.1, offset=1.0),
            t(f"blk.{i}.ffn_gate.weight", ff, hidden),
            t(f"blk.{i}.ffn_up.weight", ff, hidden),
            t(f"blk.{i}.ffn_down.weight", hidden, ff),
            t(f"blk.{i}.post_ffw_norm.weight", hidden, scale=0.1, offset=1.0),
        ]
    tensors.append(t("output_norm.weight", hidden, scale=0.1, offset=1.0))
    kvs = [
        ("general.architecture", STRING, "gemma3"),
        ("gemma3.block_count", U32, layers),
        ("gemma3.context_length", U32, ctx),
        ("gemma3.embedding_length", U32, hidden),
        ("gemma3.feed_forward_length", U32, ff),
        ("gemma3.attention.head_count", U32, heads),
        ("gemma3.attention.head_count_kv", U32, 1),
        ("gemma3.attention.key_length", U32, head_dim),
        ("gemma3.attention.value_length", U32, head_dim),
        ("gemma3.rope.freq_base", F32, 1000000.0),
        ("gemma3.attention.layer_norm_rms_epsilon", F32, 1e-6),
        ("gemma3.attention.sliding_window", U32, window),
        ("gemma3.vocab_size", U32, vocab),
    ]
    return Gguf(kvs=kvs, tensors=tensors, arrays=arrays)
