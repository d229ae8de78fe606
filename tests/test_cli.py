"""The ``cortex`` command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import cortex


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex", *args], input=stdin, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip


def test_generate_streams_the_same_text_as_the_api(smollm, model_path):
    model, tok = smollm
    proc = run("generate", "--model", str(model_path), "--max-tokens", "12", "The capital of France is")
    assert proc.returncode == 0, proc.stderr
    expected = cortex.generate(model, tok, "The capital of France is", max_tokens=12)
    assert proc.stdout == expected + "\n"
    assert "tok/s" in proc.stderr


def test_generate_chat_and_seed(smollm, model_path):
    model, tok = smollm
    args = ("generate", "--model", str(model_path), "--max-tokens", "10", "--temp", "0.8",
            "--seed", "11", "--chat", "Name a color.")  # fmt: skip
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    messages = [{"role": "user", "content": "Name a color."}]
    assert (
        first.stdout == cortex.generate(model, tok, messages, max_tokens=10, temperature=0.8, seed=11) + "\n"
    )


def test_generate_reports_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    proc = run("generate", "--model", str(bad), "hi")
    assert proc.returncode == 1
    assert "not a GGUF file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("generate", "--model", str(bad), "--temp", "-1", "hi")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_chat_keeps_the_conversation(smollm, model_path):
    model, tok = smollm
    proc = run("chat", "--model", str(model_path), "--max-tokens", "8",
               stdin="My name is Ada.\nWhat is my name?\n/reset\nHello\n/exit\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    history = [{"role": "user", "content": "My name is Ada."}]
    first = cortex.generate(model, tok, history, max_tokens=8)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}]
    second = cortex.generate(model, tok, history, max_tokens=8)
    third = cortex.generate(model, tok, [{"role": "user", "content": "Hello"}], max_tokens=8)
    assert proc.stdout == f"{first}\n{second}\n{third}\n"


def test_help_lists_verbs():
    proc = run("--help")
    assert proc.returncode == 0
    for verb in ("generate", "chat", "bench"):
        assert verb in proc.stdout


def test_convert(tmp_path):
    """``cortex convert`` to an MLX folder with --q-bits, and to a single .gguf file."""
    from hf_models import write_tiny_hf

    write_tiny_hf(tmp_path / "tiny", shards=1)
    proc = run(
        "convert",
        str(tmp_path / "tiny"),
        "-o",
        str(tmp_path / "out"),
        "--q-bits",
        "3",
        "--q-group-size",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "3-bit, group 32" in proc.stdout
    assert cortex.load_model(tmp_path / "out").forward([1, 2, 3]).shape == (96,)
    proc = run("convert", str(tmp_path / "tiny"), "--format", "gguf", "-o", str(tmp_path / "m.gguf"))
    # No tokenizer.json: a GGUF needs one, and the error says so.
    assert proc.returncode == 1 and "tokenizer" in proc.stdout
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    proc = run("convert", str(tmp_path / "nowhere"))
    assert proc.returncode == 1 and "no such file" in proc.stdout
