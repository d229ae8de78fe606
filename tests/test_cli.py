"""The ``cortex`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

import cortex


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex", *args], input=stdin, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip


def test_generate_streams_the_same_text_as_the_api(smollm, model_path):
    model, tok = smollm
    proc = run(
        "generate", "--model", str(model_path), "--max-tokens", "12", "--raw", "The capital of France is"
    )
    assert proc.returncode == 0, proc.stderr
    expected = cortex.generate(model, tok, "The capital of France is", max_tokens=12)
    assert proc.stdout == expected + "\n"
    assert "tok/s" in proc.stderr


def test_generate_uses_the_chat_template_unless_raw(smollm, model_path):
    """A plain prompt goes through the model's chat template, as mlx_lm.generate does;
    ``--raw`` (or mlx-lm's ``--ignore-chat-template``) continues the text as it is."""
    model, tok = smollm
    prompt = "Name a color."
    base = ("generate", "--model", str(model_path), "--max-tokens", "10", "--quiet")
    templated = run(*base, prompt)
    assert templated.returncode == 0, templated.stderr
    chat = cortex.generate(model, tok, [{"role": "user", "content": prompt}], max_tokens=10)
    raw = cortex.generate(model, tok, prompt, max_tokens=10)
    assert chat != raw
    assert templated.stdout == chat + "\n" == run(*base, "--chat", prompt).stdout
    assert run(*base, "--raw", prompt).stdout == raw + "\n"
    assert run(*base, "--ignore-chat-template", prompt).stdout == raw + "\n"
    system = run(*base, "--system", "Answer in French.", prompt)
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": prompt}]
    assert system.stdout == cortex.generate(model, tok, messages, max_tokens=10) + "\n"
    clash = run(*base, "--raw", "--system", "x", prompt)
    assert clash.returncode == 1 and "--system needs the chat template" in clash.stderr
    help_text = " ".join(run("generate", "--help").stdout.split())
    assert "through the model's chat template" in help_text and "--raw" in help_text


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


def _terminal_session(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """``cortex ARGS`` with a pseudo-terminal as its controlling terminal (so that Ctrl-C
    typed into it is a SIGINT, as in a real terminal); returns the process and the
    terminal's master side."""
    master, slave = pty.openpty()
    # A new session adopts the terminal (TIOCSCTTY) before running cortex.
    adopt = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, '-m', 'cortex', *sys.argv[1:]])"
    )
    proc = subprocess.Popen([sys.executable, "-c", adopt, *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)  # fmt: skip
    os.close(slave)
    return proc, master


class _Screen:
    """What a terminal's master side shows, read as it comes: ``expect`` waits for strings
    to appear in order after what earlier calls consumed (escape sequences removed, plain
    newlines), so a prompt that readline redraws while a line is typed is not mistaken
    for the next one."""

    def __init__(self, fd: int) -> None:
        self.fd, self.text, self.pos = fd, "", 0
        self._raw = b""

    def expect(self, *markers: str, timeout: float = 120) -> str:
        start, at = self.pos, self.pos
        deadline = time.monotonic() + timeout
        for marker in markers:
            while (found := self.text.find(marker, at)) < 0:
                left = deadline - time.monotonic()
                assert left > 0, f"no {marker!r} on the terminal after {self.text[start:]!r}"
                if select.select([self.fd], [], [], left)[0]:
                    try:
                        chunk = os.read(self.fd, 4096)
                    except OSError:  # EIO: the program closed the terminal
                        chunk = b""
                    assert chunk, f"the terminal closed before {marker!r}: {self.text[start:]!r}"
                    self._raw += chunk
                    shown = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]", b"", self._raw)
                    self.text = shown.decode(errors="replace").replace("\r\n", "\n")
            at = found + len(marker)
        self.pos = at
        return self.text[start:at]


def test_chat_in_a_terminal(smollm, model_path, tmp_path):
    """In a terminal: a banner naming the model; line editing (Ctrl-A) and recall (Up)
    through readline; Ctrl-C at the prompt clears the line and keeps the conversation;
    Ctrl-D quits cleanly, leaving the history for the next session. GNU readline's keys:
    libedit (macOS's Python, some builds) binds them and writes the history otherwise."""
    readline = pytest.importorskip("readline")
    if getattr(readline, "backend", None) == "editline" or "libedit" in (readline.__doc__ or ""):
        pytest.skip("readline is libedit here, not GNU readline")
    model, tok = smollm
    env = {**os.environ, "CORTEX_HOME": str(tmp_path), "TERM": "xterm"}
    proc, fd = _terminal_session(["chat", "--model", str(model_path), "--max-tokens", "8"], env)
    screen = _Screen(fd)
    try:
        banner = screen.expect(">>> ")
        assert "cortex chat · SmolLM2-135M-Instruct.Q4_1 (135M parameters" in banner
        assert "Ctrl-D quits" in banner and "↑/↓ recall" in banner

        history = [{"role": "user", "content": "My name is Ada."}]
        first = cortex.generate(model, tok, history, max_tokens=8)
        os.write(fd, b"name is Ada.\x01My \r")  # typed, then Ctrl-A and the start of the line
        screen.expect(first, "\n>>> ")

        # A SIGINT that lands between readline drawing the prompt and waiting for a key is
        # only noticed at the next key (CPython's readline loop); a person is never that fast.
        time.sleep(0.5)
        os.write(fd, b"\x03")  # Ctrl-C at an empty prompt
        screen.expect("\n>>> ")
        os.write(fd, b"never sent")
        screen.expect("never sent")  # shown (a Ctrl-C sent with it would flush it unread)
        time.sleep(0.5)
        os.write(fd, b"\x03")  # Ctrl-C clears a half-typed line
        screen.expect("\n>>> ")

        question = {"role": "user", "content": "What is my name?"}
        history += [{"role": "assistant", "content": first}, question]
        second = cortex.generate(model, tok, history, max_tokens=8)
        assert second != cortex.generate(model, tok, [question], max_tokens=8)  # the test can tell
        os.write(fd, b"What is my name?\r")
        screen.expect(second, "\n>>> ")

        os.write(fd, b"\x1b[A\r")  # Up: the last line again
        history += [{"role": "assistant", "content": second}, question]
        screen.expect("What is my name?", cortex.generate(model, tok, history, max_tokens=8), "\n>>> ")

        os.write(fd, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
    saved = (tmp_path / "chat_history").read_text().splitlines()
    assert saved == ["My name is Ada.", "What is my name?"]  # a repeated line is kept once
    assert "never sent" not in saved


def test_chat_banner_offers_recall_only_with_readline(smollm):
    """Without readline (Windows without a port) the arrow keys recall nothing, and the
    banner does not say they do."""
    from cortex.cli.chat import banner

    model, _ = smollm
    assert "↑/↓ recall" in banner(model)
    without = banner(model, recall=False)
    assert "↑/↓" not in without and "Enter sends · /reset" in without and "Ctrl-D quits" in without
