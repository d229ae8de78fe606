"""The converter end to end, against references Cortex did not write: MLX's own output for
the same model (``fixtures/mlx_lm``, made by mlx-lm), the ``gguf`` package's dequantizer and
reader, and the numpy reference model. Plus the faults: interrupted conversions, mismatched
outputs, broken sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors_io as st
from hf_models import TINY, family, write_tiny_hf
from numpy_reference import forward, mean_kl

import cortex
from cortex import ConversionConfig, MLXConverter, QuantizationRecipe

FIXTURES = Path(__file__).parent / "fixtures" / "mlx_lm"


def _dequantize_mlx(tensors: dict, module: str, bits: int, group: int) -> np.ndarray:
    from test_quant import unpack

    _, packed = tensors[f"{module}.weight"]
    dt, scales = tensors[f"{module}.scales"]
    _, biases = tensors[f"{module}.biases"]
    as_f32 = st.from_bf16 if dt == "BF16" else (lambda a: a.astype(np.float32))
    cols = packed.shape[1] * 32 // bits
    q = unpack(packed, bits, cols).astype(np.float32)
    return np.repeat(as_f32(scales), group, 1) * q + np.repeat(as_f32(biases), group, 1)


# ── Against mlx-lm ───────────────────────────────────────────────────────────────────────────


def test_same_bytes_as_mlx_lm(tmp_path: Path) -> None:
    """The tiny bf16 llama converted by Cortex (4-bit, group 32) is tensor-for-tensor,
    bit-for-bit what mlx-lm writes, with the same quantization config and shard metadata."""
    ok, message, out = MLXConverter(tmp_path).convert_model(
        str(FIXTURES / "source"), "tiny", ConversionConfig(group_size=32)
    )
    assert ok, message
    ours, ref = st.read_folder(out), st.read_folder(FIXTURES / "q4g32")
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name][0] == ref[name][0], name
        np.testing.assert_array_equal(ours[name][1], ref[name][1], err_msg=name)
    assert st.read(out / "model.safetensors")[1] == {"format": "mlx"}
    config = json.loads((out / "config.json").read_text())
    ref_config = json.loads((FIXTURES / "q4g32" / "config.json").read_text())
    assert config["quantization"] == ref_config["quantization"] == config["quantization_config"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ref_index = json.loads((FIXTURES / "q4g32" / "model.safetensors.index.json").read_text())
    assert index == ref_index


@pytest.mark.parametrize("folder", ["source", "q4g32"])
def test_runs_mlx_lm_folders(folder: str) -> None:
    """Cortex runs both the HF bf16 folder and mlx-lm's quantized output; computed in f32,
    logits match mlx-lm's own float32 forward pass within 1e-4 relative, and the quantized
    kernels (8-bit activations) stay within KL 0.02 of it."""
    ref = np.load(FIXTURES / "logits.npz")
    model = cortex.load_model(FIXTURES / folder)
    ids = ref["ids"].tolist()
    got = model.dequantize().forward(ids, all_positions=True)
    np.testing.assert_allclose(got, ref[folder], rtol=1e-4, atol=1e-4 * np.abs(ref[folder]).max())
    assert mean_kl(ref[folder], model.forward(ids, all_positions=True)) < 0.02


# ── SmolLM2 GGUF ─────────────────────────────────────────────────────────────────────────────


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order back to HF's (inverse of convert_hf_to_gguf's permute)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_smollm_gguf_to_mlx_g32_is_lossless(model_path: Path, tmp_path: Path) -> None:
    """The 4-bit recipe at group 32 transfers Q4_1 → 4-bit g32 and, since a recipe never
    lowers a GGUF tensor below its stored precision, the Q8_0 embedding → 8-bit g32: every
    quantized weight dequantizes (numpy, MLX rule) to exactly what the `gguf` package
    dequantizes from the source, and validation (like with like, both in f32) sees no
    difference at all."""
    ok, message, out = MLXConverter(tmp_path).convert_model(
        str(model_path), "smol", ConversionConfig(group_size=32)
    )
    assert ok, message
    record = json.loads((out / "conversion.json").read_text())
    assert all(t["lossless"] for t in record["per_tensor"].values())
    assert record["per_tensor"]["model.embed_tokens.weight"]["bits"] == 8
    assert record["bits"] == 4 and record["bits_used"] == [4, 8]
    # Before the precision floor and like-with-like validation: 82.0 % and KL 0.061.
    assert record["quality"]["top1_agreement"] == 1.0
    assert record["quality"]["mean_kl"] < 1e-6

    reader = gguf.GGUFReader(model_path)
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])
    src = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    ours = st.read_folder(out)
    checks = {
        "model.embed_tokens": ("token_embd.weight", 8, None),
        "model.layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", 4, heads),
        "model.layers.3.self_attn.k_proj": ("blk.3.attn_k.weight", 4, kv_heads),
        "model.layers.5.mlp.down_proj": ("blk.5.ffn_down.weight", 4, None),
    }
    for module, (gguf_name, bits, permuted_heads) in checks.items():
        want = src[gguf_name].astype(np.float32)
        if permuted_heads:
            want = _unpermute(want, permuted_heads)
        np.testing.assert_array_equal(_dequantize_mlx(ours, module, bits, 32), want, err_msg=module)


def test_smollm_default_recipe_reports_quality(model_path: Path, tmp_path: Path) -> None:
    """4-bit g64 (a real requantization): KL and top-1 agreement are measured on 256 tokens,
    written to conversion.json and stated in the message; the result runs."""
    ok, message, out = MLXConverter(tmp_path).convert_model(str(model_path))
    assert ok, message
    assert out.name == "SmolLM2-135M-Instruct.Q4_1_4bit"
    record = json.loads((out / "conversion.json").read_text())
    q = record["quality"]
    assert q["tokens"] >= 256
    assert "mean KL" in message and f"{q['mean_kl']:.4f}" in message
    # Measured: mean KL 0.30, top-1 66% (0.46 / 57% before the tied Q8_0 embedding/head kept
    # its 8 bits). Requantizing Q4_1's groups of 32 into groups of 64 compounds two
    # roundings; with group 32 the same recipe is lossless (test_smollm_gguf_to_mlx_g32...).
    assert q["mean_kl"] < 0.5 and q["top1_agreement"] > 0.55
    assert record["per_tensor"]["model.embed_tokens.weight"]["bits"] == 8
    assert record["bits"] == 4 and record["group_size"] == 64
    model, tokenizer = cortex.load(out)
    # Packed codes, scales and biases held in memory as stored (in their bf16/f16 type).
    file_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(model.weight_bytes - file_bytes) < 0.01 * file_bytes
    # The tokenizer files generated from the GGUF metadata give the same ids as the source.
    source_tokenizer = cortex.load_tokenizer(model_path)
    text = "Tell me about Rust, the language 🦀!"
    assert tokenizer.encode(text) == source_tokenizer.encode(text)
    assert cortex.generate(model, tokenizer, "The capital of France is", max_tokens=8)
    listed = MLXConverter(tmp_path).list_converted_models()
    assert listed[out.name]["bits"] == 4 and listed[out.name]["size_gb"] > 0.05


def test_smollm_to_gguf_reads_back(model_path: Path, tmp_path: Path) -> None:
    """GGUF output read with the `gguf` package: block types per the documented mapping,
    shapes and tokenizer/chat-template metadata as in the source; Cortex runs it."""
    config = ConversionConfig(group_size=32, output_format="gguf")
    ok, message, out = MLXConverter(tmp_path).convert_model(str(model_path), "smol_gguf", config)
    assert ok, message
    files = list(out.glob("*.gguf"))
    assert len(files) == 1
    reader = gguf.GGUFReader(files[0])
    source = gguf.GGUFReader(model_path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0"  # the source's type: never lowered
    assert {t.name: list(t.shape) for t in reader.tensors} == {t.name: list(t.shape) for t in source.tensors}
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "llama.context_length"):
        assert key in reader.fields, key
    assert reader.fields["general.architecture"].contents() == "llama"
    # Every block copied as stored: the output computes exactly what the source does.
    record = json.loads((out / "conversion.json").read_text())
    assert all(t["lossless"] for t in record["per_tensor"].values())
    assert record["quality"]["top1_agreement"] == 1.0


def test_smollm_lowering_below_the_gguf_precision_must_be_asked(model_path: Path, tmp_path: Path) -> None:
    """A predicate naming bits, or `bits_override` (`cortex convert --q-bits`), may put the
    Q8_0 embedding at 4 bits; the recipe alone does not."""
    pred = lambda path, shape: {"bits": 4} if "embed" in path else True  # noqa: E731
    config = ConversionConfig(
        group_size=32, validate_conversion=False, mixed_precision_config={"predicate": pred}
    )
    conv = MLXConverter(tmp_path)
    ok, message, out = conv.convert_model(str(model_path), "asked", config)
    assert ok, message
    record = json.loads((out / "conversion.json").read_text())
    assert record["per_tensor"]["model.embed_tokens.weight"]["bits"] == 4
    config = ConversionConfig(
        quantization=QuantizationRecipe.QUALITY_8BIT, group_size=32, validate_conversion=False
    )
    ok, message, out = conv._convert(str(model_path), tmp_path / "override", config, bits_override=4)
    assert ok, message
    record = json.loads((out / "conversion.json").read_text())
    assert set(record["bits_used"]) == {4}


def test_smollm_float_export_validates_like_with_like(model_path: Path, tmp_path: Path) -> None:
    """A float export of the Q4_1 model holds the source's values exactly (f32: f16 cannot
    hold a GGML block's values), and validation, computing both models in f32, sees no
    difference. It measured 94.5 % top-1 when the source ran with 8-bit activations (and
    the export was f16)."""
    config = ConversionConfig(quantization=QuantizationRecipe.NONE)
    ok, message, out = MLXConverter(tmp_path).convert_model(str(model_path), "float", config)
    assert ok, message
    record = json.loads((out / "conversion.json").read_text())
    assert all(t["lossless"] for t in record["per_tensor"].values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert record["quality"]["top1_agreement"] == 1.0 and record["quality"]["mean_kl"] < 1e-9


# ── A tiny HF llama: sharded safetensors, float reference ────────────────────────────────────

FAMILY = family("llama")
IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 93]


def _reference_names() -> dict[str, str]:
    """HF module path → the numpy reference's tensor name."""
    names = {"model.embed_tokens": "token_embd.weight", "model.norm": "output_norm.weight"}
    leaves = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for n in range(TINY["layers"]):
        names.update({f"model.layers.{n}.{hf}": f"blk.{n}.{g}.weight" for hf, g in leaves.items()})
    return names


def test_tiny_sharded_hf_llama_converts_and_runs(tmp_path: Path) -> None:
    """The float HF folder (two shards + index) matches the numpy reference (1e-4
    relative). Its 4-bit conversion loads back and, computed in f32, matches the reference
    run on the weights dequantized independently (numpy, MLX rule), so the packed layout is
    exact (and the kernels, with 8-bit activations, stay within KL 0.02); the 8-bit one
    stays close to the float model (mean KL ≤ 0.02; measured 0.011 on this random model, 8-bit
    activations included)."""
    ref_w = write_tiny_hf(tmp_path / "tiny")
    want = forward(ref_w, FAMILY, IDS)
    got = cortex.load_model(tmp_path / "tiny").forward(IDS, all_positions=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    conv = MLXConverter(tmp_path / "cache")

    ok, message, out = conv.convert_model(str(tmp_path / "tiny"), config=ConversionConfig(group_size=32))
    assert ok, message
    tensors = st.read_folder(out)
    deq = {}
    for module, ref_name in _reference_names().items():
        if f"{module}.scales" in tensors:
            deq[ref_name] = _dequantize_mlx(tensors, module, 4, 32)
        else:
            deq[ref_name] = tensors[f"{module}.weight"][1]
    q4 = cortex.load_model(out)
    want_q4 = forward(deq, FAMILY, IDS)
    np.testing.assert_allclose(
        q4.dequantize().forward(IDS, all_positions=True), want_q4, rtol=1e-4, atol=1e-4
    )
    # The kernels round activations to 8 bits per block of 32 (measured KL 0.003 here).
    assert mean_kl(want_q4, q4.forward(IDS, all_positions=True)) < 0.02
    # No tokenizer files: validation falls back to fixed token ids and still measures KL.
    record = json.loads((out / "conversion.json").read_text())
    assert record["quality"]["tokenizer"] is False and "mean_kl" in record["quality"]

    ok, message, out = conv.convert_model(
        str(tmp_path / "tiny"), config=ConversionConfig(quantization=QuantizationRecipe.QUALITY_8BIT)
    )
    assert ok, message
    assert mean_kl(want, cortex.load_model(out).forward(IDS, all_positions=True)) <= 0.02


def test_mixed_precision_recipe_and_predicates(tmp_path: Path) -> None:
    """MIXED: embeddings at 6 bits, projections at 4, recorded as per-module overrides; a
    3-argument predicate `(path, module, config)` is accepted too."""
    write_tiny_hf(tmp_path / "tiny")
    conv = MLXConverter(tmp_path / "cache")
    ok, message, out = conv.convert_model(
        str(tmp_path / "tiny"), config=ConversionConfig(quantization=QuantizationRecipe.MIXED_PRECISION)
    )
    assert ok, message
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 64, "bits": 6}
    record = json.loads((out / "conversion.json").read_text())
    assert record["per_tensor"]["model.layers.0.mlp.up_proj.weight"]["bits"] == 4
    assert record["per_tensor"]["model.norm.weight"]["bits"] is None

    seen = []

    def pred(path, module, cfg):  # type: ignore[no-untyped-def]
        seen.append((path, module.weight.shape, cfg["model_type"]))
        return hasattr(module, "to_quantized") and "down_proj" not in path

    ok, message, out = conv.convert_model(
        str(tmp_path / "tiny"), "pred", ConversionConfig(mixed_precision_config={"predicate": pred})
    )
    assert ok, message
    assert ("model.layers.1.mlp.down_proj", (64, 128), "llama") in seen
    names = st.read_folder(out)
    assert "model.layers.0.mlp.down_proj.scales" not in names
    assert "model.layers.0.mlp.up_proj.scales" in names
    assert cortex.load_model(out).forward(IDS).shape == (TINY["vocab"],)


def test_predicate_is_called_back_from_rust(tmp_path: Path) -> None:
    """The plan is made in Rust, on the conversion's worker thread, which calls the predicate
    once per candidate matrix with the source's config; what it raises or returns amiss
    fails the conversion with a message naming the predicate and the module."""
    import threading

    write_tiny_hf(tmp_path / "tiny")
    conv = MLXConverter(tmp_path / "cache")
    threads, paths = set(), []

    def pred(path, shape):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        paths.append((path, shape))
        return {"bits": 8, "group_size": 32} if path.endswith("embed_tokens") else False

    config = ConversionConfig(mixed_precision_config={"predicate": pred}, validate_conversion=False)
    ok, message, out = conv.convert_model(str(tmp_path / "tiny"), "pred", config)
    assert ok, message
    assert threading.main_thread().name not in threads
    assert ("model.embed_tokens", (TINY["vocab"], 64)) in paths
    assert all(len(shape) == 2 for _, shape in paths)  # norms are never offered
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    # The recipe's setting (4-bit, group 64) is the default; the one module is an override.
    assert quantization == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }

    def broken(path, shape):  # type: ignore[no-untyped-def]
        raise KeyError("oops")

    for bad, fragment in ((broken, "KeyError"), (lambda p, s: {"bits": 7}, "7 bits are not supported")):
        config = ConversionConfig(mixed_precision_config={"predicate": bad}, validate_conversion=False)
        ok, message, _ = conv.convert_model(str(tmp_path / "tiny"), "bad", config)
        assert not ok and fragment in message and "predicate" in message, message
        assert not (tmp_path / "cache" / "bad").exists()


def test_bad_group_size_is_rejected_once_naming_the_parameter(tmp_path: Path) -> None:
    """Group sizes are checked in one place, in Rust, before the source is even opened; the
    supported values come from there too."""
    assert cortex._core.SUPPORTED_GROUP_SIZES == (32, 64, 128)
    with pytest.raises(cortex.RequestValidationError) as err:
        cortex._core.convert(tmp_path / "no such model", tmp_path / "out", group_size=48)
    assert err.value.param == "group_size"
    assert "48 is not supported (supported: [32, 64, 128])" in str(err.value)
    write_tiny_hf(tmp_path / "tiny")
    ok, message, out = MLXConverter(tmp_path / "cache").convert_model(
        str(tmp_path / "tiny"), config=ConversionConfig(group_size=48)
    )
    assert (ok, out) == (False, None)
    assert "'group_size': 48 is not supported" in message
    assert not list((tmp_path / "cache").iterdir())


def test_mlx_output_needs_an_existing_directory(tmp_path: Path) -> None:
    """MLX output goes into a directory the caller made: a missing one is a parameter error
    naming it, said before anything is converted (not as a missing shard after)."""
    write_tiny_hf(tmp_path / "tiny")
    with pytest.raises(cortex.RequestValidationError) as err:
        cortex._core.convert(tmp_path / "tiny", tmp_path / "missing", validate=False)
    assert err.value.param == "out" and "missing" in str(err.value)
    assert not (tmp_path / "missing").exists()


def test_cancelled_conversion_stops_with_cancelled_error(tmp_path: Path) -> None:
    """Conversion reports to the same `Progress` a load does, and stops with
    `CancelledError` once it is cancelled."""
    write_tiny_hf(tmp_path / "tiny")
    (tmp_path / "out").mkdir()
    progress = cortex._core.Progress()
    progress.cancel()
    with pytest.raises(cortex.CancelledError):
        cortex._core.convert(tmp_path / "tiny", tmp_path / "out", progress=progress)
    progress = cortex._core.Progress()
    report = cortex._core.convert(tmp_path / "tiny", tmp_path / "out", validate=False, progress=progress)
    done, total = progress.get()
    assert done == total == len(report["per_tensor"]) > 0
    assert report["quality"] is None and report["source_format"] == "safetensors"


# ── Faults ───────────────────────────────────────────────────────────────────────────────────


def test_existing_outputs_are_reused_or_refused(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path / "tiny")
    conv = MLXConverter(tmp_path / "cache")
    ok, _, out = conv.convert_model(str(tmp_path / "tiny"), "x")
    assert ok
    ok, message, again = conv.convert_model(str(tmp_path / "tiny"), "x")
    assert ok and again == out and "cached" in message
    ok, message, none = conv.convert_model(
        str(tmp_path / "tiny"), "x", ConversionConfig(quantization=QuantizationRecipe.QUALITY_8BIT)
    )
    assert not ok and none is None
    assert "recipe '4bit' (wanted '8bit')" in message
    assert json.loads((out / "conversion.json").read_text())["recipe"] == "4bit"  # untouched
    (tmp_path / "cache" / "foreign").mkdir()
    ok, message, _ = conv.convert_model(str(tmp_path / "tiny"), "foreign")
    assert not ok and "not a Cortex conversion" in message


def _broken_sources(tmp: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    d = tmp / "no_config"
    write_tiny_hf(d, shards=1)
    (d / "config.json").unlink()
    cases["missing config.json"] = (d, "config.json")
    d = tmp / "unknown_type"
    write_tiny_hf(d, shards=1)
    (d / "config.json").write_text(json.dumps({"model_type": "transmogrifier", "hidden_size": 8}))
    cases["unknown model_type"] = (d, "unsupported architecture 'transmogrifier'")
    d = tmp / "escaping_index"
    write_tiny_hf(d, shards=1)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["shard outside the folder"] = (d, "escapes model directory")
    d = tmp / "corrupt_header"
    write_tiny_hf(d, shards=1)
    shard = d / "model-00001-of-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"{{{{"
    shard.write_bytes(bytes(raw))
    cases["corrupt safetensors header"] = (d, "invalid JSON in header")
    return cases


def test_broken_sources_fail_cleanly(tmp_path: Path) -> None:
    """(False, message naming the problem, None) and nothing written to the cache."""
    cache = tmp_path / "cache"
    for what, (src, fragment) in _broken_sources(tmp_path / "src").items():
        ok, message, out = MLXConverter(cache).convert_model(str(src))
        assert (ok, out) == (False, None), what
        assert fragment in message, (what, message)
        assert not cache.exists() or not any(cache.iterdir()), what


def test_output_inside_the_source_is_refused(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path / "tiny")
    ok, message, _ = MLXConverter(tmp_path / "tiny").convert_model(str(tmp_path / "tiny"))
    assert not ok and "inside the source" in message


CHILD = """
import sys
from cortex import MLXConverter, ConversionConfig
config = ConversionConfig(group_size=32)
ok, message, out = MLXConverter(sys.argv[2]).convert_model(sys.argv[1], "out", config)
print("finished", ok, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_conversion_leaves_nothing_finished(model_path: Path, tmp_path: Path, sig: int) -> None:
    """Ctrl-C (KeyboardInterrupt, temporary removed) or SIGKILL (temporary left, removed by
    the next run) mid-conversion: no output folder appears; the next conversion succeeds."""
    cache = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(model_path), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(cache.glob(".out.tmp-*/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=60)
    assert "finished" not in stdout, stdout
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in stderr, stderr
        assert not list(cache.glob(".out.tmp-*"))
    assert not (cache / "out").exists()
    ok, message, _out = MLXConverter(cache).convert_model(
        str(model_path), "out", ConversionConfig(group_size=32, validate_conversion=False)
    )
    assert ok, message
    assert not list(cache.glob(".out.tmp-*"))


SWAP_CHILD = """
import os, signal, sys
from cortex import ConversionConfig, MLXConverter

real_replace = os.replace


def dying_replace(src, dst):
    # The second rename (new folder into place) never happens: killed between the two.
    if os.path.basename(src).startswith(".out.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)


os.replace = dying_replace
config = ConversionConfig(validate_conversion=False, cache_converted=False)
MLXConverter(sys.argv[2]).convert_model(sys.argv[1], "out", config)
print("finished", flush=True)
"""


def _first_conversion(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny model converted to `cache/out`, with a marker file to recognise that copy."""
    write_tiny_hf(tmp_path / "tiny")
    ok, message, out = MLXConverter(tmp_path / "cache").convert_model(
        str(tmp_path / "tiny"), "out", ConversionConfig(validate_conversion=False)
    )
    assert ok and out == tmp_path / "cache" / "out", message
    (out / "marker").write_text("first")
    return tmp_path / "tiny", out


def test_killed_between_the_swap_renames_the_next_run_restores_the_old_output(tmp_path: Path) -> None:
    """SIGKILL after the earlier output was moved aside and before the new one took its
    name: nothing is under the name then, but the next run puts the earlier, complete
    output back (and reuses it) instead of deleting both copies and rebuilding."""
    src, out = _first_conversion(tmp_path)
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SWAP_CHILD), str(src), str(out.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists()
    assert len(list(out.parent.glob(".out.old-*"))) == 1  # the earlier output, complete
    ok, message, again = MLXConverter(out.parent).convert_model(
        str(src), "out", ConversionConfig(validate_conversion=False)
    )
    assert ok and again == out and "cached" in message, message
    assert (out / "marker").read_text() == "first"
    assert cortex.load_model(out).forward([1, 2, 3]).shape == (TINY["vocab"],)
    # The killed attempt's temporary is removed by the next fresh conversion.
    ok, message, _ = MLXConverter(out.parent).convert_model(
        str(src), "out", ConversionConfig(validate_conversion=False, cache_converted=False)
    )
    assert ok, message
    assert not list(out.parent.glob(".out.*"))


def test_exception_between_the_swap_renames_puts_the_old_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (any exception) between the two renames: the earlier output is renamed back
    at once, so the name never stays empty."""
    src, out = _first_conversion(tmp_path)
    real_replace = os.replace

    def interrupted_replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if Path(a).name.startswith(".out.tmp-"):
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        MLXConverter(out.parent).convert_model(
            str(src), "out", ConversionConfig(validate_conversion=False, cache_converted=False)
        )
    monkeypatch.undo()
    assert (out / "marker").read_text() == "first"
    assert not list(out.parent.glob(".out.*"))


def test_optimize_for_chip(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path / "tiny")
    conv = MLXConverter(tmp_path / "cache")
    ok, _, out = conv.convert_model(str(tmp_path / "tiny"))
    assert ok
    assert conv.optimize_for_chip(out, "m3_max") is True
    config = json.loads((out / "config.json").read_text())
    assert config["chip_optimization"]["chip"] == "m3_max"
    with pytest.raises(ValueError, match=r"unknown chip 'm9'.*m1"):
        conv.optimize_for_chip(out, "m9")


def test_hf_cache_repo_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id found in the local Hugging Face cache converts without network; one that
    is not there fails with a message naming the cache."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    write_tiny_hf(snapshot, shards=1)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conv = MLXConverter(tmp_path / "cache")
    ok, message, out = conv.convert_model("org/tiny")
    assert ok, message
    assert out.name == "org_tiny_4bit"
    ok, message, _ = conv.convert_model("org/absent")
    assert not ok and "not in the cache" in message


def test_compat_import_paths() -> None:
    from cortex.metal.mlx_converter import ConversionConfig as C
    from cortex.metal.mlx_converter import ConversionFormat
    from cortex.metal.mlx_converter import MLXConverter as M
    from cortex.metal.mlx_converter import QuantizationRecipe as Q

    assert C is ConversionConfig and M is MLXConverter and Q is QuantizationRecipe
    assert [r.value for r in Q] == ["4bit", "5bit", "8bit", "mixed", "none"]
    assert {f.name for f in ConversionFormat} == {"HUGGINGFACE", "SAFETENSORS", "PYTORCH", "GGUF"}
    c = ConversionConfig()
    assert (c.quantization, c.group_size, c.cache_converted, c.validate_conversion, c.output_format) == (
        Q.SPEED_4BIT,
        64,
        True,
        True,
        "mlx",
    )
    assert MLXConverter().cache_dir == cortex.cortex_home() / "mlx_models"
    assert os.fspath(MLXConverter("/x").cache_dir) == "/x"


def _write_torch_checkpoint(
    path: Path, tensors: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `pytorch_model.bin` in PyTorch's zip format (``archive/data.pkl`` + one file per
    storage), written without torch: stand-in ``torch`` modules make pickle emit the same
    global references (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``)."""
    import collections
    import io
    import pickle
    import types
    import zipfile

    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None: ...

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    float_storage = type("FloatStorage", (), {"__module__": "torch"})
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    torch_mod.FloatStorage = float_storage  # type: ignore[attr-defined]
    torch_mod._utils = utils_mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Storage:
        def __init__(self, key: str, numel: int):
            self.key, self.numel = key, numel

    class Tensor:
        def __init__(self, key: str, arr: np.ndarray):
            self.key, self.arr = key, arr

        def __reduce__(self):  # type: ignore[no-untyped-def]
            stride = tuple(s // 4 for s in self.arr.strides)
            args = (
                Storage(self.key, self.arr.size),
                0,
                self.arr.shape,
                stride,
                False,
                collections.OrderedDict(),
            )
            return (_rebuild_tensor_v2, args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):  # type: ignore[no-untyped-def]
            if isinstance(obj, Storage):
                return ("storage", float_storage, obj.key, "cpu", obj.numel)
            return None

    state = collections.OrderedDict((name, Tensor(str(i), a)) for i, (name, a) in enumerate(tensors.items()))
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for i, a in enumerate(tensors.values()):
            zf.writestr(f"archive/data/{i}", np.ascontiguousarray(a, np.float32).tobytes())


def test_pytorch_bin_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch checkpoint is read by candle's pickle interpreter (no code runs) and
    converts to the same model as its safetensors twin."""
    write_tiny_hf(tmp_path / "st", shards=1)
    tensors = {name: arr for name, (_, arr) in st.read_folder(tmp_path / "st").items()}
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    _write_torch_checkpoint(tmp_path / "pt" / "pytorch_model.bin", tensors, monkeypatch)
    conv = MLXConverter(tmp_path / "cache")
    config = ConversionConfig(quantization=QuantizationRecipe.QUALITY_8BIT, validate_conversion=False)
    ok_pt, message, from_pt = conv.convert_model(str(tmp_path / "pt"), config=config)
    assert ok_pt, message
    ok_st, message, from_st = conv.convert_model(str(tmp_path / "st"), config=config)
    assert ok_st, message
    a, b = st.read_folder(from_pt), st.read_folder(from_st)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
    assert json.loads((from_pt / "conversion.json").read_text())["source_format"] == "pytorch"


def test_mlx_folder_source_and_float_recipe(tmp_path: Path) -> None:
    """An MLX folder re-converts: to the same bits and group as a lossless transfer, to 8
    bits from its dequantized weights, and to float (no `quantization` in config.json, the
    source's torch_dtype)."""
    conv = MLXConverter(tmp_path)
    src = str(FIXTURES / "q4g32")
    ok, message, same = conv.convert_model(src, "same", ConversionConfig(group_size=32))
    assert ok, message
    record = json.loads((same / "conversion.json").read_text())
    assert record["source_format"] == "mlx"
    assert all(t["lossless"] for t in record["per_tensor"].values())
    a, b = st.read_folder(same), st.read_folder(FIXTURES / "q4g32")
    assert all(np.array_equal(a[k][1], b[k][1]) for k in b)
    ok, message, q8 = conv.convert_model(
        src, "q8", ConversionConfig(quantization=QuantizationRecipe.QUALITY_8BIT)
    )
    assert ok, message
    assert json.loads((q8 / "config.json").read_text())["quantization"]["bits"] == 8
    ok, message, flt = conv.convert_model(
        src, "float", ConversionConfig(quantization=QuantizationRecipe.NONE)
    )
    assert ok, message
    config = json.loads((flt / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "bfloat16"
    tensors = st.read_folder(flt)
    assert {dt for dt, _ in tensors.values()} == {"BF16"}
    ref = np.load(FIXTURES / "logits.npz")
    for out in (q8, flt):
        got = cortex.load_model(out).forward(ref["ids"].tolist(), all_positions=True)
        assert mean_kl(ref["q4g32"], got) < 0.01


def test_source_format_must_match_and_cache_is_used(tmp_path: Path) -> None:
    from cortex import ConversionFormat

    conv = MLXConverter(tmp_path / "cache")
    src = str(FIXTURES / "source")
    ok, message, _ = conv.convert_model(src, config=ConversionConfig(source_format=ConversionFormat.GGUF))
    assert not ok and "source_format is GGUF" in message
    ok, _, first = conv.convert_model(
        src, "named", ConversionConfig(source_format=ConversionFormat.SAFETENSORS)
    )
    assert ok
    cache = json.loads((tmp_path / "cache" / "conversion_cache.json").read_text())
    assert any(v["path"] == str(first) for v in cache.values())
    # Same source and settings without a name: the cached conversion is found and reused.
    ok, message, again = conv.convert_model(
        src, config=ConversionConfig(source_format=ConversionFormat.SAFETENSORS)
    )
    assert ok and again == first and "cached" in message


def test_mlx_model_stays_packed_in_memory(model_path: Path, tmp_path: Path) -> None:
    """Loading an MLX 4-bit folder costs about its file size in resident memory, far from
    the f32 size (measured in a fresh process: VmRSS after load minus before)."""
    ok, message, out = MLXConverter(tmp_path).convert_model(
        str(model_path), "m", ConversionConfig(validate_conversion=False)
    )
    assert ok, message
    code = (
        "import cortex, sys\n"
        "def rss():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "before = rss(); m = cortex.load_model(sys.argv[1]); print(rss() - before, m.num_parameters)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    grown, params = map(int, proc.stdout.split())
    file_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert grown < 1.5 * file_bytes, (grown, file_bytes)
    assert grown < 0.3 * params * 4  # the f32 size


def test_output_is_sharded_past_the_shard_limit(tmp_path: Path) -> None:
    """Past the shard size (5 GiB by default, 40 kB here) the weights go to numbered shards
    that the index maps, as mlx-lm names them; the model loads back unchanged."""
    write_tiny_hf(tmp_path / "tiny")
    out = tmp_path / "cache" / "sharded"
    config = ConversionConfig(quantization=QuantizationRecipe.NONE, validate_conversion=False)
    ok, message, _ = MLXConverter(tmp_path / "cache")._convert(
        str(tmp_path / "tiny"), out, config, max_shard_bytes=40_000
    )
    assert ok, message
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        tensors, meta = st.read(out / shard)
        assert meta == {"format": "mlx"}
        assert all(index["weight_map"][n] == shard for n in tensors)
    want = cortex.load_model(tmp_path / "tiny").forward(IDS, all_positions=True)
    np.testing.assert_array_equal(cortex.load_model(out).forward(IDS, all_positions=True), want)
