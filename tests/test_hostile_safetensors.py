"""Bad and hostile safetensors folders and configs (RELIABILITY.md A1-A6, A19-A21, B1-B2):
each gives the right CortexError subclass naming the problem, never a panic, and the
process goes on loading models."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors_io as st
from hf_models import write_tiny_hf

import cortex

SHARD = "model-00001-of-00001.safetensors"


def _tiny(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1)
    return folder


def _rewrite_header(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / SHARD
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _raw(data: bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / SHARD).write_bytes(data)

    return apply


def _header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda folder: _rewrite_header(folder, edit)


def _set_shape(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [65]


def _overlap(h: dict) -> None:
    h["model.norm.weight"]["data_offsets"] = [0, 256]


def _unknown_dtype(h: dict) -> None:
    h["model.norm.weight"]["dtype"] = "Q4"


def _f64(h: dict) -> None:
    # A dtype the safetensors crate knows but Cortex does not compute with; same byte count.
    h["model.norm.weight"].update(dtype="F64", shape=[32])


def _end_before_start(h: dict) -> None:
    name = _first_tensor(h)
    start, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [end, start]


def _huge_dims(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [2**62, 2**62]


def _truncate(folder: Path) -> None:
    raw = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(raw[:-100])


def _trailing(folder: Path) -> None:
    with open(folder / SHARD, "ab") as f:
        f.write(b"\0" * 8)


def _duplicate_key(folder: Path) -> None:
    path = folder / SHARD
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode().rstrip()
    entry = json.dumps({"dtype": "F32", "shape": [64], "data_offsets": [0, 256]})
    h = (text[:-1] + f', "model.norm.weight": {entry}' + "}").encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


CASES = {
    "A1 header longer than the file": (_raw(struct.pack("<Q", 10**9) + b"{}"), "exceeds the file"),
    "A1 header over 100 MB": (_raw(struct.pack("<Q", 200 << 20) + b" " * 64), "limit"),
    "A2 header not UTF-8": (_raw(struct.pack("<Q", 8) + b"\xff\xfe{}    "), "not UTF-8"),
    "A2 header not JSON": (_raw(struct.pack("<Q", 8) + b"nonsense"), "invalid JSON in header"),
    "A2 200-deep JSON": (_raw(struct.pack("<Q", 400) + b"[" * 200 + b"]" * 200), "invalid JSON in header"),
    "A3 overlapping offsets": (_header(_overlap), "overlap"),
    "A3 truncated data": (_truncate, "truncated or trailing"),
    "A3 trailing bytes": (_trailing, "truncated or trailing"),
    "A4 shape does not match bytes": (_header(_set_shape), "does not match its byte range"),
    "A4 shape overflows": (_header(_huge_dims), "does not match its byte range"),
    "A5 duplicate tensor name": (_duplicate_key, "duplicate tensor name 'model.norm.weight'"),
    "A6 unknown dtype": (_header(_unknown_dtype), "supported: F32"),
    "A6 dtype Cortex does not compute with": (_header(_f64), 'has dtype "F64"; supported: F32'),
    "A3 range ending before its start": (_header(_end_before_start), "starts at"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_safetensors(tmp_path: Path, case: str) -> None:
    folder = _tiny(tmp_path)
    corrupt, fragment = CASES[case]
    corrupt(folder)
    with pytest.raises(cortex.ModelFormatError) as info:
        cortex.load_model(folder)
    assert fragment in str(info.value), str(info.value)
    assert SHARD in str(info.value) or "m" in str(info.value)
    # Still usable.
    good = tmp_path / "good"
    write_tiny_hf(good, shards=1)
    assert cortex.load_model(good).forward([1, 2]).shape == (96,)


def test_shard_index_faults(tmp_path: Path) -> None:
    """A19/A20: an index naming a shard outside the folder (path or symlink), a missing
    shard, a tensor in two shards, a tensor the index misplaces."""
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def with_map(**changes: str) -> None:
        wm = dict(index["weight_map"], **changes)
        index_path.write_text(json.dumps({"weight_map": wm}))

    for bad in ("../../x.safetensors", "/etc/passwd", "a/../../x.safetensors"):
        with_map(**{"model.norm.weight": bad})
        with pytest.raises(cortex.ModelFormatError, match="escapes model directory"):
            cortex.load_model(folder)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    with_map(**{"model.norm.weight": "link.safetensors"})
    with pytest.raises(cortex.ModelFormatError, match="escapes model directory"):
        cortex.load_model(folder)
    os.unlink(folder / "link.safetensors")
    with_map(**{"model.norm.weight": "model-00009-of-00009.safetensors"})
    with pytest.raises(cortex.ModelFormatError, match="does not exist"):
        cortex.load_model(folder)
    wrong = (
        "model-00002-of-00002.safetensors"
        if index["weight_map"]["model.norm.weight"].startswith("model-00001")
        else "model-00001-of-00002.safetensors"
    )
    with_map(**{"model.norm.weight": wrong})
    with pytest.raises(cortex.ModelFormatError, match="is not in shard"):
        cortex.load_model(folder)


def test_duplicate_tensor_across_files_without_index(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1)
    (folder / "model.safetensors.index.json").unlink()  # every *.safetensors is read then
    st.write(folder / "extra.safetensors", {"model.norm.weight": ("F32", np.ones(64, np.float32))})
    with pytest.raises(cortex.ModelFormatError, match="appears in two weight files"):
        cortex.load_model(folder)


def test_wrong_tensor_shape_is_named(tmp_path: Path) -> None:
    """A21: a tensor present with the wrong shape fails at load with both shapes."""
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1)
    tensors, meta = st.read(folder / SHARD)
    tensors["model.embed_tokens.weight"] = ("F32", np.zeros((96, 65), np.float32))
    st.write(folder / SHARD, tensors, meta)
    with pytest.raises(
        cortex.ModelFormatError,
        match=r"'model.embed_tokens.weight' has shape \[96, 65\], expected \[96, 64\]",
    ):
        cortex.load_model(folder)


CONFIG_CASES = {
    "B1 not JSON": ("{not json", "config.json", "invalid JSON"),
    "B1 missing hidden_size": ({"hidden_size": None}, "hidden_size", "missing"),
    "B1 wrong type": ({"hidden_size": "64"}, "hidden_size", "non-negative integer"),
    "B2 absurd layers": ({"num_hidden_layers": 10**9}, "num_hidden_layers", "outside"),
    "B2 absurd vocab": ({"vocab_size": 2**40}, "vocab_size", "outside"),
    "B2 zero heads": ({"num_attention_heads": 0}, "num_attention_heads", "outside"),
    "B2 heads do not divide": (
        {"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None},
        "num_attention_heads",
        "not divisible",
    ),
    "B2 context 10^12": ({"max_position_embeddings": 10**12}, "max_position_embeddings", "outside"),
    "B3 unknown rope scaling": (
        {"rope_scaling": {"rope_type": "wobbly", "factor": 2}},
        "rope_scaling",
        "not supported",
    ),
    "B3 rope factor NaN": (
        {"rope_scaling": {"rope_type": "linear", "factor": -1}},
        "rope_scaling",
        "not supported",
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_json(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1)
    change, field, fragment = CONFIG_CASES[case]
    if isinstance(change, str):
        (folder / "config.json").write_text(change)
    else:
        config = json.loads((folder / "config.json").read_text())
        config.update(change)
        config = {k: v for k, v in config.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(cortex.ConfigError) as info:
        cortex.load_model(folder)
    assert info.value.field == field, info.value.field
    assert fragment in str(info.value), str(info.value)


def test_unknown_model_type_lists_supported(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1, model_type="transmogrifier")
    with pytest.raises(cortex.UnsupportedArchitectureError, match="supported: llama, mistral, gemma3_text"):
        cortex.load_model(folder)


def test_weights_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_tiny_hf(folder, shards=1)
    (folder / "config.json").unlink()
    with pytest.raises(cortex.ModelNotFoundError, match=r"no config\.json"):
        cortex.load_model(folder)
