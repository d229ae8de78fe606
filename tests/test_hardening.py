"""Hardening (issue 14): config values that reach arithmetic are validated first (item 7),
both transformers 4.x and 5.x spellings of config.json load (item 11), and a process forked
after generating gets an error instead of hanging (item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hf_models import write_tiny_hf

import cortex
from cortex import _core

MLX_Q4 = Path(__file__).parent / "fixtures" / "mlx_lm" / "q4g32"
IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _mlx_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "q4"
    shutil.copytree(MLX_Q4, folder)
    return folder


# ── Item 7: config values checked before any arithmetic ──────────────────────────────────


def _quant(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(c: dict[str, Any]) -> None:
        for name in ("quantization", "quantization_config"):
            c[name][key] = value

    return edit


def _module_override(c: dict[str, Any]) -> None:
    for name in ("quantization", "quantization_config"):
        c[name]["model.layers.0.mlp.up_proj"] = {"bits": 0, "group_size": 32}


MLX_CASES = {
    "bits=0": (_quant("bits", 0), "quantization.bits"),
    "bits=7": (_quant("bits", 7), "quantization.bits"),
    "group_size=0": (_quant("group_size", 0), "quantization.group_size"),
    "group_size=48": (_quant("group_size", 48), "quantization.group_size"),
    "override bits=0": (_module_override, "quantization.model.layers.0.mlp.up_proj.bits"),
}


@pytest.mark.parametrize("case", list(MLX_CASES))
def test_bad_mlx_quantization_is_a_config_error(tmp_path: Path, case: str) -> None:
    """`quantization.bits = 0` used to divide by zero ("internal error (please report)")
    in the parameter count; every bits / group size is checked as config.json is read."""
    edit, field = MLX_CASES[case]
    folder = _mlx_copy(tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(cortex.ConfigError) as err:
        cortex.load_model(folder)
    assert err.value.field == field
    assert "supported" in str(err.value)
    # The converter reads the same settings (it divided by bits too).
    with pytest.raises(cortex.ConfigError):
        _core.convert(folder, tmp_path / "out", validate=False)
    assert cortex.load_model(MLX_Q4).forward([1, 2, 3]).shape == (64,)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.update({key: value})


HF_CASES = {
    # The loader takes each layer index modulo the pattern.
    "sliding_window_pattern=0": (
        "gemma3_text",
        _set("sliding_window_pattern", 0),
        "sliding_window_pattern",
    ),
    "rope_local_base_freq=0": ("gemma3_text", _set("rope_local_base_freq", 0.0), "rope_local_base_freq"),
    "rope_theta past f32": ("llama", _set("rope_theta", 1e39), "rope_theta"),
    "llama3 original context 0.5": (
        "llama",
        _set(
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 0.5,
            },
        ),
        "rope_scaling.original_max_position_embeddings",
    ),
    "layer_types of another layout": (
        "gemma3_text",
        lambda c: (
            c.update({"layer_types": ["full_attention"] + ["sliding_attention"] * 6})
            or c.pop("sliding_window_pattern")
        ),
        "layer_types",
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_config_values_are_config_errors(tmp_path: Path, case: str) -> None:
    model_type, edit, field = HF_CASES[case]
    write_tiny_hf(tmp_path / "m", model_type=model_type, shards=1)
    _edit_config(tmp_path / "m", edit)
    with pytest.raises(cortex.ConfigError) as err:
        cortex.load_model(tmp_path / "m")
    assert err.value.field == field


# ── Item 11: transformers 5.x spellings ──────────────────────────────────────────────────


def _v5_rope(c: dict[str, Any]) -> None:
    """What transformers 5.x writes: RoPE settings under `rope_parameters` only."""
    params = {"rope_theta": c.pop("rope_theta"), **(c.pop("rope_scaling", None) or {"rope_type": "default"})}
    c["rope_parameters"] = params


def _v5_moe(c: dict[str, Any]) -> None:
    _v5_rope(c)
    c["num_local_experts"] = c.pop("num_experts")


def _v5_gemma(c: dict[str, Any]) -> None:
    assert c.pop("rope_scaling") == {"rope_type": "linear", "factor": 8.0}
    c["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": c.pop("rope_theta")},
        "sliding_attention": {"rope_type": "default", "rope_theta": c.pop("rope_local_base_freq")},
    }
    pattern = c.pop("sliding_window_pattern")
    c["layer_types"] = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(c["num_hidden_layers"])
    ]


def _v4_gemma_linear(c: dict[str, Any]) -> None:
    c["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

V5_CASES: dict[str, tuple[str, Callable[[dict[str, Any]], None] | None, Callable[[dict[str, Any]], None]]] = {
    # (model_type, edit giving the 4.x config, edit of that giving the 5.x one)
    "qwen3_moe": ("qwen3_moe", None, _v5_moe),
    "llama yarn": ("llama", lambda c: c.update({"rope_scaling": dict(YARN)}), _v5_rope),
    # Not phi's defaults (0.5 of each head, theta 10000), so that ignoring them shows.
    "phi partial rotary": (
        "phi",
        lambda c: c.update({"partial_rotary_factor": 0.25, "rope_theta": 500.0}),
        lambda c: c.update(
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": c.pop("rope_theta"),
                    "partial_rotary_factor": c.pop("partial_rotary_factor"),
                }
            }
        ),
    ),
    "gemma3 per layer type": ("gemma3_text", _v4_gemma_linear, _v5_gemma),
}


@pytest.mark.parametrize("case", list(V5_CASES))
def test_transformers_5_spellings_load_as_4_spellings(tmp_path: Path, case: str) -> None:
    """A checkpoint saved by transformers 5.x (`num_local_experts`, `rope_parameters`,
    `layer_types`) gives the same logits as the same weights with the 4.x config; Qwen3-MoE
    from 5.x was refused ("num_experts missing")."""
    model_type, v4_edit, v5_edit = V5_CASES[case]
    write_tiny_hf(tmp_path / "v4", model_type=model_type, shards=1)
    if v4_edit is not None:
        _edit_config(tmp_path / "v4", v4_edit)
    shutil.copytree(tmp_path / "v4", tmp_path / "v5")
    _edit_config(tmp_path / "v5", v5_edit)
    v5_config = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert not {"rope_theta", "rope_scaling", "num_experts", "sliding_window_pattern"} & set(v5_config)
    want = cortex.load_model(tmp_path / "v4").forward(IDS, all_positions=True)
    got = cortex.load_model(tmp_path / "v5").forward(IDS, all_positions=True)
    np.testing.assert_array_equal(got, want)


def test_rope_parameters_theta_matters_and_errors_name_the_5x_field(tmp_path: Path) -> None:
    """The theta is really read from `rope_parameters` (another theta changes the logits), and
    an error in it names the field as the file spells it."""
    write_tiny_hf(tmp_path / "m", shards=1)
    _edit_config(tmp_path / "m", _v5_rope)
    base = cortex.load_model(tmp_path / "m").forward(IDS, all_positions=True)
    _edit_config(tmp_path / "m", lambda c: c["rope_parameters"].update(rope_theta=500.0))
    assert not np.allclose(
        base, cortex.load_model(tmp_path / "m").forward(IDS, all_positions=True), atol=1e-3
    )
    _edit_config(tmp_path / "m", lambda c: c["rope_parameters"].update(rope_theta=0.5))
    with pytest.raises(cortex.ConfigError) as err:
        cortex.load_model(tmp_path / "m")
    assert err.value.field == "rope_parameters.rope_theta"
    _edit_config(tmp_path / "m", lambda c: c["rope_parameters"].update(rope_theta=1e4, rope_type="dynamic"))
    with pytest.raises(cortex.ConfigError) as err:
        cortex.load_model(tmp_path / "m")
    assert err.value.field == "rope_parameters"


# ── Item 6: fork after generating ────────────────────────────────────────────────────────

FORK_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import cortex

    model, tok = cortex.load(sys.argv[1])
    assert cortex.generate(model, tok, "w3 w4", max_tokens=3, ignore_eos=True)
    # A stream started before the fork, iterated in the child.
    stream = iter(cortex.stream_generate(model, tok, "w3 w4", max_tokens=1000, ignore_eos=True))
    next(stream)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = []
        for name, call in [
            ("generate", lambda: cortex.generate(model, tok, "w3 w4", max_tokens=3, ignore_eos=True)),
            ("forward", lambda: model.forward([1, 2, 3])),
            ("load", lambda: cortex.load_model(sys.argv[1])),
            ("stream", lambda: next(stream)),
        ]:
            start = time.monotonic()
            try:
                call()
                out.append(f"{name}: no error")
            except cortex.CortexError as e:
                out.append(f"{name}: {type(e).__name__} {time.monotonic() - start:.3f}s {e}")
        os.write(w, "\\n".join(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        print(f.read())
    os.waitpid(pid, 0)
    # The parent is untouched.
    assert cortex.generate(model, tok, "w3 w4", max_tokens=3, ignore_eos=True)
    print("parent ok")
    """
)


def test_fork_after_generating_raises_in_the_child(tmp_path: Path) -> None:
    """A child forked after the compute threads started used to hang forever in generate
    and forward; now each call raises EngineError at once, naming the spawn start method.
    A subprocess with a timeout, so that a hang fails the test instead of stalling it."""
    write_tiny_hf(tmp_path / "m", tokenizer="word", shards=1)
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "m")], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the forked child hung: {e.stdout!r}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "parent ok"
    for name in ("generate", "forward", "load", "stream"):
        (line,) = [x for x in lines if x.startswith(f"{name}:")]
        assert "EngineError" in line and "spawn" in line, line
        assert float(line.split()[2].rstrip("s")) < 0.5, line


def test_fork_before_any_model_leaves_the_child_usable(tmp_path: Path) -> None:
    """Only threads that existed before the fork matter: a child forked right after
    `import cortex` loads and runs models normally."""
    write_tiny_hf(tmp_path / "m", shards=1)
    code = textwrap.dedent(
        """
        import os, sys
        import cortex
        pid = os.fork()
        if pid == 0:
            ok = cortex.load_model(sys.argv[1]).forward([1, 2]).shape == (96,)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ── Item 10: logits reach Python without copies ──────────────────────────────────────────


def _owner(a: np.ndarray) -> object:
    """The object at the end of `a`'s chain of bases (what holds the memory)."""
    base: object = a
    while isinstance(base, np.ndarray):
        if base.base is None:
            return base
        base = base.base
    return base


def test_logits_are_numpy_arrays_over_the_rust_buffer(tmp_path: Path) -> None:
    """The logits Vec becomes the array's buffer (rust-numpy): no byte copy and no
    bytearray in between, as there were (`to_le_bytes` into a Vec, then a bytearray that
    `numpy.frombuffer` wrapped)."""
    write_tiny_hf(tmp_path / "m", shards=1)
    model = cortex.load_model(tmp_path / "m")
    for logits in (model.forward(IDS, all_positions=True), model.forward(IDS)):
        assert logits.dtype == np.float32 and logits.flags.c_contiguous and logits.flags.writeable
        owner = _owner(logits)
        assert not isinstance(owner, (bytes, bytearray, memoryview, np.ndarray)), type(owner)
    assert model.forward(IDS, all_positions=True).shape == (len(IDS), 96)
    assert model.forward(IDS).shape == (96,)
    # A batch's sequences are views of one buffer, each over its own rows.
    short, long = IDS[:4], IDS[::-1]
    a, b = model.forward_batch([long, short], all_positions=True)
    assert (a.shape, b.shape) == ((len(long), 96), (len(short), 96))
    assert _owner(a) is _owner(b) and not np.shares_memory(a, b)
    # Batched rows sum in another order (test_families), hence a tolerance.
    np.testing.assert_allclose(b, model.forward(short, all_positions=True), rtol=1e-4, atol=5e-5)
    c, d = model.forward_batch([long, short])
    assert c.shape == d.shape == (96,)
    np.testing.assert_allclose(d, model.forward(short), rtol=1e-4, atol=5e-5)
