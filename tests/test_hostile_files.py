"""Bad and hostile model files (RELIABILITY.md §2.A): each gives the right CortexError
subclass naming the problem, never a panic, an abort or a hang, and leaves the process
able to load and run models."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf_writer import ARRAY, F32, I32, STRING, U8, U32, U64, Gguf, Tensor, tiny_llama

import cortex


def load(path):
    return cortex.load_model(path)


def test_tiny_valid_model_loads_and_runs(tmp_path):
    path = tmp_path / "tiny.gguf"
    tiny_llama().write(path)
    model = load(path)
    assert model.config["num_key_value_heads"] == 1 and model.config["tie_word_embeddings"]
    logits = model.forward([1, 2, 3], all_positions=True)
    assert logits.shape == (3, 16) and np.isfinite(logits).all()


def _expect(tmp_path, data: bytes, exc: type[Exception], fragment: str):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(exc) as info:
        load(path)
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, cortex.CortexError)
    return info.value


def _with(**changes) -> Gguf:
    g = tiny_llama()
    for k, v in changes.items():
        setattr(g, k, v)
    return g


def test_empty_file(tmp_path):
    _expect(tmp_path, b"", cortex.ModelFormatError, "not a GGUF file")


def test_wrong_magic(tmp_path):
    _expect(tmp_path, _with(magic=b"GGML").to_bytes(), cortex.ModelFormatError, "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    _expect(tmp_path, _with(version=version).to_bytes(), cortex.ModelFormatError, "unsupported GGUF version")


def test_big_endian(tmp_path):
    data = _with(version=struct.unpack("<I", struct.pack(">I", 3))[0]).to_bytes()
    _expect(tmp_path, data, cortex.ModelFormatError, "big-endian")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated(tmp_path, keep):
    data = tiny_llama().to_bytes()
    err = _expect(tmp_path, data[: int(len(data) * keep)], cortex.ModelFormatError, "")
    assert "truncated" in str(err) or "past the end" in str(err)


def test_tensor_data_beyond_end(tmp_path):
    g = tiny_llama()
    g.tensors[-1].dims = [g.tensors[-1].dims[0] << 16]  # declares far more than it holds
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "past the end of the file")


@pytest.mark.parametrize(("ty", "v"), [(U32, 0), (U32, 3), (U32, 2**31), (U64, 32), (STRING, "32")])
def test_bad_alignment(tmp_path, ty, v):
    g = tiny_llama()
    g.kvs.append(("general.alignment", ty, v))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "general.alignment")


@pytest.mark.parametrize("dims", [[2**32, 2**32], [2**63 + 4, 2], [8, 0], [1, 1, 1, 1, 1]])
def test_bad_dims(tmp_path, dims):
    g = tiny_llama()
    g.tensors[0].dims = dims
    err = _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "token_embd.weight")
    assert "dims" in str(err)


def test_unknown_ggml_type(tmp_path):
    g = tiny_llama()
    g.tensors[0].ggml_type = 999
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "unknown ggml type 999")


@pytest.mark.parametrize(("type_id", "name"), [(16, "IQ2_XXS"), (21, "IQ3_S"), (39, "MXFP4")])
def test_unsupported_ggml_type_is_named(tmp_path, type_id, name):
    g = tiny_llama()
    g.tensors[0].ggml_type = type_id
    err = _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, f"ggml type {name} ({type_id})")
    assert "Q4_K_M" in str(err)


def test_iq4_xs_row_not_a_whole_block(tmp_path):
    """IQ4_XS, which candle does not know, has its own block size checked (256 values)."""
    g = tiny_llama()
    g.tensors[0].ggml_type = 23
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "not a multiple of the IQ4_XS block size 256")


def test_duplicate_tensor_name(tmp_path):
    g = tiny_llama()
    g.tensors.append(Tensor("output_norm.weight", [8], b"\0" * 32))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "duplicate tensor name 'output_norm.weight'")


def test_duplicate_metadata_key(tmp_path):
    g = tiny_llama()
    g.kvs.append(("llama.block_count", U32, 1))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "duplicate metadata key")


@pytest.mark.parametrize("field", ["tensor_count", "kv_count"])
def test_counts_beyond_file_size(tmp_path, field):
    _expect(tmp_path, _with(**{field: 2**63}).to_bytes(), cortex.ModelFormatError, "more than the file")


def test_huge_string_length(tmp_path):
    g = tiny_llama()
    data = g.to_bytes()
    # The first key's length prefix sits right after the 24-byte header.
    data = data[:24] + struct.pack("<Q", 2**40) + data[32:]
    _expect(tmp_path, data, cortex.ModelFormatError, "string length")


def test_huge_array_without_data(tmp_path):
    g = tiny_llama()
    g.kvs.append(("tokenizer.ggml.tokens", ARRAY, (U8, [])))
    data = g.to_bytes()
    # Rewrite the array length (last kv) to 2^29 with no elements behind it.
    i = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
    data = data[:i] + struct.pack("<Q", 2**29) + data[i + 8 :]
    _expect(tmp_path, data, cortex.ModelFormatError, "tokenizer.ggml.tokens")


def test_deeply_nested_arrays(tmp_path):
    nested: tuple = (U8, [1])
    for _ in range(100):
        nested = (ARRAY, [nested])
    g = tiny_llama()
    g.kvs.append(("x.nested", ARRAY, nested))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "nesting depth")


def test_overlapping_tensors(tmp_path):
    g = tiny_llama()
    g.tensors[1].offset = 0  # on top of token_embd
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "overlaps")


def _retype(data: bytes, name: str, old: int, new: int) -> bytes:
    """`data` with the ggml type of tensor `name` changed from `old` to `new` in its header
    entry (a 4-byte edit)."""
    at = data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    at += 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, at) == (old,)
    return data[:at] + struct.pack("<I", new) + data[at + 4 :]


def test_retyped_tensor_in_a_real_model(tmp_path, model_path):
    """Issue 14 item 3: one tensor of the real SmolLM2 file retyped Q4_1 -> Q4_0 (a 4-byte
    edit) describes fewer bytes than it has; llama.cpp's tiling rule refuses the gap that
    leaves before the next tensor, instead of loading and generating nonsense."""
    data = _retype(model_path.read_bytes(), "blk.0.ffn_down.weight", 3, 2)
    _expect(tmp_path, data, cortex.ModelFormatError, "leaves a gap")


def test_retyped_last_tensor(tmp_path):
    """The last tensor retyped F32 -> F16 leaves bytes after it that no tensor describes."""
    g = tiny_llama()
    g.tensors[-1].dims = [64]
    g.tensors[-1].data = b"\0" * 256
    data = _retype(g.to_bytes(), g.tensors[-1].name, 0, 1)
    _expect(tmp_path, data, cortex.ModelFormatError, "follow the last tensor")


def test_gap_between_tensors(tmp_path):
    g = tiny_llama()
    g.tensors[2].offset = sum(len(t.data) + (-len(t.data) % 32) for t in g.tensors[:2]) + 32
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "leaves a gap")


def test_wrong_shape_for_architecture(tmp_path):
    g = tiny_llama()
    g.tensors[0] = Tensor("token_embd.weight", [9, 16], b"\0" * 9 * 16 * 4)
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "has shape [16, 9], expected [16, 8]")


def test_missing_tensor(tmp_path):
    g = tiny_llama()
    g.tensors = [t for t in g.tensors if t.name != "blk.0.ffn_up.weight"]
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "'blk.0.ffn_up.weight' is missing")


@pytest.mark.parametrize(
    ("key", "v", "fragment"),
    [
        ("llama.attention.head_count", 0, "outside"),
        ("llama.block_count", 10**6, "outside"),
        ("llama.context_length", 2**40, "outside"),
        ("llama.attention.head_count_kv", 3, "outside"),
    ],
)
def test_bad_config_values(tmp_path, key, v, fragment):
    g = tiny_llama()
    g.kvs = [(k, U64, v) if k == key else (k, t, old) for k, t, old in g.kvs]
    err = _expect(tmp_path, g.to_bytes(), cortex.ConfigError, fragment)
    assert err.field == key


def test_unsupported_architecture(tmp_path):
    g = tiny_llama()
    g.kvs[0] = ("general.architecture", STRING, "bert")
    err = _expect(tmp_path, g.to_bytes(), cortex.UnsupportedArchitectureError, "llama")
    assert err.architecture == "bert"


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(cortex.ModelNotFoundError, match="no model weights") as info:
        load(tmp_path)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_path(tmp_path):
    with pytest.raises(cortex.ModelNotFoundError):
        load(tmp_path / "nope.gguf")


def test_process_still_usable(smollm):
    model, tok = smollm
    assert cortex.generate(model, tok, "The capital of France is", max_tokens=2) == " Paris."


def test_empty_metadata_key(tmp_path):
    g = tiny_llama()
    g.kvs.append(("", U32, 1))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "empty metadata key")


def test_tensor_name_too_long(tmp_path):
    g = tiny_llama()
    g.tensors.append(Tensor("x" * 64, [8], b"\0" * 32))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "must be 1 to 63 bytes")


def test_unaligned_tensor_offset(tmp_path):
    g = tiny_llama()
    g.tensors[-1].offset = 4 + len(b"".join(t.data for t in g.tensors[:-1]))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "not a multiple of the alignment")


def test_row_not_divisible_by_block_size(tmp_path):
    g = tiny_llama()
    g.tensors[0].ggml_type = 2  # Q4_0: blocks of 32 values, and this row has 8
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "not a multiple of the Q4_0 block size 32")


def test_metadata_array_over_the_documented_cap(tmp_path):
    """RELIABILITY A11: a kept (tokenizer) array is capped at 4 Mi elements, each of which
    becomes a 32-byte value in memory."""
    g = tiny_llama()
    g.kvs.append(("tokenizer.ggml.scores", ARRAY, (F32, np.zeros(5 << 20, np.float32))))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "exceeds the limit")


def test_metadata_memory_total_cap(tmp_path):
    """Issue 14 item 2: arrays each under the per-array cap but together over the total
    (3 x 4 Mi i32 under tokenizer keys, 48 MB on disk, ~400 MB parsed) are refused before
    they are built."""
    g = tiny_llama()
    for i in range(3):
        g.kvs.append((f"tokenizer.extra{i}", ARRAY, (I32, np.zeros(4 << 20, np.int32))))
    _expect(tmp_path, g.to_bytes(), cortex.ModelFormatError, "MiB of memory")


def _peak_rss_mib(path) -> float:
    """Peak RSS of a fresh process that imports Cortex and opens `path` (a failed load
    counts too: only the memory matters here)."""
    code = (
        "import resource, sys, cortex\n"
        "try:\n    cortex.load_model(sys.argv[1])\nexcept cortex.CortexError:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return float(out.stdout.strip())


def test_unused_metadata_arrays_cost_no_memory(tmp_path):
    """Issue 14 item 2: 32 MB of legal u8 arrays that the loader does not use (which cost
    ~1 GB as 32-byte values) are stepped over, not materialised."""
    small, big = tmp_path / "small.gguf", tmp_path / "big.gguf"
    tiny_llama().write(small)
    g = tiny_llama()
    for i in range(8):
        g.kvs.append((f"x.pad{i}", ARRAY, (U8, np.zeros(4 << 20, np.uint8))))
    g.write(big)
    assert big.stat().st_size > 32 << 20
    assert cortex.load_model(big).config["vocab_size"] == 16
    assert _peak_rss_mib(big) - _peak_rss_mib(small) < 48
