"""A minimal safetensors reader and writer for the tests, written from the format's
description (8-byte header length, JSON header, data), independent of Cortex's own."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# bfloat16 has no numpy type: it is kept as uint16 bit patterns.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I64": np.int64}


def read(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """``{name: (dtype, array)}`` and the metadata."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        start, end = e["data_offsets"]
        arr = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
        out[name] = (e["dtype"], arr)
    return out, meta


def write(
    path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> None:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs = []
    offset = 0
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr, dtype=DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounding to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def read_folder(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a model folder (all its ``*.safetensors``)."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors, _ = read(f)
        out.update(tensors)
    return out
