"""GGUF files of ggml's non-linear 4-bit types (IQ4_NL, IQ4_XS), which candle does not
know: they load, run and convert, and their values are exactly what the `gguf` package
(llama.cpp's own Python reader, independent of ours) dequantizes from the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_writer import ARRAY, I32, STRING, tiny_llama
from numpy_reference import mean_kl
from test_tokenizer import MERGES, TOKENS, TYPES

import cortex
from cortex import ConversionConfig, MLXConverter, QuantizationRecipe

LEVELS = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)
IQ4_NL, IQ4_XS = 20, 23
IDS = [1, 5, 9, 2, 7, 3, 11, 4]


def _codes(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The nearest level's index for each value of `x` ([..., 32]) at `scale` ([..., 1])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(scale != 0, x / scale, 0.0)
    return np.abs(t[..., None] - LEVELS).argmin(-1).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes as [..., 16] bytes: value j in the low nibble, j + 16 in the high."""
    return q[..., :16] | (q[..., 16:] << 4)


def quantize_iq4(x: np.ndarray, type_id: int) -> bytes:
    """A plain IQ4 quantizer (the largest magnitude on the level -127, the nearest level for
    the rest): only the layout matters here, which the `gguf` package then reads."""
    groups = x.reshape(-1, 32).astype(np.float32)
    big = np.take_along_axis(groups, np.abs(groups).argmax(1)[:, None], 1)
    scale = big / -127.0  # [groups, 1]
    if type_id == IQ4_NL:
        d = scale.astype(np.float16)
        q = _codes(groups, d.astype(np.float32))
        return np.concatenate([d.view(np.uint8), _nibbles(q)], axis=1).tobytes()
    # IQ4_XS: a super-block's f16 d, and per group of 32 a 6-bit ls with d · (ls - 32) ≈ scale.
    sup = scale.reshape(-1, 8)
    d = (np.abs(sup).max(1, keepdims=True) / 32.0).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.clip(np.rint(np.where(d != 0, sup / d.astype(np.float32), 0)) + 32, 0, 63)
    ls = ls.astype(np.uint16)
    dl = d.astype(np.float32) * (ls.astype(np.float32) - 32)
    q = _codes(groups.reshape(-1, 8, 32), dl[..., None])
    high = np.zeros(len(ls), dtype=np.uint16)
    for g in range(8):
        high |= (ls[:, g] >> 4) << (2 * g)
    low = (ls & 0xF).astype(np.uint8)
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    parts = [d.view(np.uint8), high[:, None].view(np.uint8), scales_l, _nibbles(q).reshape(len(ls), -1)]
    return np.concatenate(parts, axis=1).tobytes()


def _files(tmp_path: Path, type_id: int) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A tiny llama whose matrices are of `type_id`, and the same model in f32 holding the
    `gguf` package's dequantization of those blocks."""
    g, f32 = (tiny_llama(vocab=len(TOKENS), hidden=256, heads=4, kv_heads=2, ff=512, layers=2) for _ in "ab")
    for model in (g, f32):
        model.kvs += [
            ("tokenizer.ggml.model", STRING, "gpt2"),
            ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS)),
            ("tokenizer.ggml.merges", ARRAY, (STRING, MERGES)),
            ("tokenizer.ggml.token_type", ARRAY, (I32, TYPES)),
        ]
    qtype = gguf.GGMLQuantizationType(type_id)
    want = {}
    for t, ref in zip(g.tensors, f32.tensors):
        arr = g.arrays[t.name]
        if arr.ndim != 2:
            continue
        t.data, t.ggml_type = quantize_iq4(arr, type_id), type_id
        raw = np.frombuffer(t.data, dtype=np.uint8).reshape(arr.shape[0], -1)
        want[t.name] = gguf.dequantize(raw, qtype).astype(np.float32)
        assert want[t.name].shape == arr.shape
        ref.data = want[t.name].astype("<f4").tobytes()
    # The quantizer is good enough for a meaningful comparison.
    err = np.mean([np.abs(want[n] - g.arrays[n]).mean() / np.abs(g.arrays[n]).mean() for n in want])
    assert err < 0.15, err
    paths = tmp_path / f"iq{type_id}.gguf", tmp_path / f"iq{type_id}_f32.gguf"
    g.write(paths[0])
    f32.write(paths[1])
    return paths[0], paths[1], want


@pytest.mark.parametrize("type_id", [IQ4_NL, IQ4_XS])
def test_iq4_gguf_loads_exactly(tmp_path: Path, type_id: int) -> None:
    """The model's weights, dequantized from our kernels' layout, give in f32 what the f32
    file of the `gguf` package's values gives (1e-5: two float matmul paths); the kernels,
    with 8-bit activations, stay within KL 0.02 of it; generation runs. The weights keep
    4-bit codes in memory: under 1.6 times the file's bytes (1.1 and 1.4 times with their scales
    and biases; 2.0 and 2.3 times as 8-bit codes)."""
    path, ref_path, _ = _files(tmp_path, type_id)
    model = cortex.load_model(path)
    assert model.weight_bytes < 1.6 * path.stat().st_size
    ref = cortex.load_model(ref_path).forward(IDS, all_positions=True)
    np.testing.assert_allclose(model.dequantize().forward(IDS, all_positions=True), ref, rtol=1e-5, atol=1e-5)
    assert mean_kl(ref, model.forward(IDS, all_positions=True)) < 0.02


@pytest.mark.parametrize("type_id", [IQ4_NL, IQ4_XS])
def test_iq4_gguf_converts(tmp_path: Path, type_id: int) -> None:
    """To float: every matrix is the `gguf` package's dequantization, bit for bit. To MLX
    4-bit g32 (levels that are not a linear scale: a requantization), the record names the
    stored type, and the result is what the f32 file of the same values converts to."""
    path, ref_path, want = _files(tmp_path, type_id)
    name = "IQ4_NL" if type_id == IQ4_NL else "IQ4_XS"
    conv = MLXConverter(tmp_path / "cache")
    ok, message, out = conv.convert_model(
        str(path), "q4", ConversionConfig(group_size=32, validate_conversion=False)
    )
    assert ok, message
    record = json.loads((out / "conversion.json").read_text())
    matrices = [t for t in record["per_tensor"].values() if t["bits"] is not None]
    assert matrices and all(t["source"] == name and t["bits"] == 4 for t in matrices)
    ok, message, ref_out = conv.convert_model(
        str(ref_path), "q4_ref", ConversionConfig(group_size=32, validate_conversion=False)
    )
    assert ok, message
    np.testing.assert_array_equal(
        cortex.load_model(out).forward(IDS, all_positions=True),
        cortex.load_model(ref_out).forward(IDS, all_positions=True),
    )

    ok, message, out = conv.convert_model(
        str(path),
        "gguf_f32",
        ConversionConfig(
            output_format="gguf", quantization=QuantizationRecipe.NONE, validate_conversion=False
        ),
    )
    assert ok, message
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    for n, w in want.items():
        np.testing.assert_array_equal(got[n].reshape(w.shape), w, err_msg=n)
