"""What hostile model files, tokenizers and chat templates cost: time and peak memory of
each case, in a fresh process, and how it ended (RELIABILITY.md A11, B15, B16).

    python benches/hostile_inputs.py [--python PATH] [--timeout 120] [CASE ...]

Each case runs in a child process started with ``--python`` (default: this interpreter),
so an older build installed in another venv can be measured beside this one; a case that
aborts or is killed (out of memory) is reported with its signal, and peak RSS is the
child's own high-water mark (``VmHWM``; about 35 MiB of it is importing Cortex). Files are written once
into a temporary folder by this process, not by the child being measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gguf_writer import ARRAY, STRING, U8, tiny_llama

#: Chat templates that build huge values in a few steps.
TEMPLATES = {
    "template: list doubled 40x": "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}"
    "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    "template: string doubled 40x": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "template: chained replace on 10 MB": "{% set s = 'a' * 10000000 %}"
    "{{ s|replace('a', 'aaaaaaaaaa')|replace('a', 'aaaaaaaaaa')|length }}",
    "template: huge join": "{{ range(100000)|join('x' * 1000000) }}",
    "template: tojson(indent=1e9)": "{{ messages|tojson(indent=1000000000) }}",
}

#: Run in the child: argv[1] is the case kind, argv[2] its file or folder.
CHILD = """
import json, resource, sys, time
import cortex
kind, path = sys.argv[1], sys.argv[2]
start = time.monotonic()
try:
    if kind == "template":
        _, tok = cortex.load(path)
        tok.apply_chat_template([{"role": "user", "content": "ab"}])
    elif kind == "gguf":
        cortex.load_model(path)
    else:
        tok = cortex.load_tokenizer(path)
        tok.encode("a" * 100)
    outcome = "ok"
except cortex.CortexError as e:
    outcome = type(e).__name__
seconds = time.monotonic() - start
# VmHWM is this process's own peak (ru_maxrss would carry the parent's across fork + exec).
try:
    status = open("/proc/self/status").read()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_mib": peak_kib / 1024}))
"""


def tiny_tokenizer_gguf(path: Path, template: str) -> Path:
    g = tiny_llama()
    tokens = ["<|endoftext|>", "a", "b", "ab"] + [f"t{i}" for i in range(12)]
    g.kvs += [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, ["a b"])),
        ("tokenizer.chat_template", STRING, template),
    ]
    g.write(path)
    return path


def metadata_gguf(path: Path, megabytes: int) -> Path:
    """A valid tiny model carrying `megabytes` of u8 arrays the loader does not use."""
    g = tiny_llama()
    for i in range(megabytes // 4):
        g.kvs.append((f"x.pad{i}", ARRAY, (U8, np.zeros(4 << 20, np.uint8))))
    g.write(path)
    return path


def multiplying_normalizer(folder: Path) -> Path:
    """A tokenizer.json whose normalizer is `Replace "a" -> "a" x 1000`, three times."""
    replace = {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 1000}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [replace] * 3},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "vocab": {"a": 0, "b": 1},
            "merges": [],
            "dropout": None,
            "unk_token": None,
            "fuse_unk": False,
            "byte_fallback": False,
        },
    }
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter whose Cortex is measured")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case is stopped")
    ap.add_argument("cases", nargs="*", help="case names (substrings); default: all")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cases = [
            (name, "template", lambda t=t, n=i: tiny_tokenizer_gguf(d / f"t{n}.gguf", t))
            for i, (name, t) in enumerate(TEMPLATES.items())
        ]
        cases += [
            (
                f"GGUF: {mb} MB of u8 metadata arrays",
                "gguf",
                lambda mb=mb: metadata_gguf(d / f"meta{mb}.gguf", mb),
            )
            for mb in (32, 192)
        ]
        cases.append(
            (
                "tokenizer: Replace a -> a x 1000, chained 3x, on 'a' x 100",
                "tokenizer",
                lambda: multiplying_normalizer(d / "normalizer"),
            )
        )
        print(f"{'case':<62} {'outcome':<26} {'seconds':>8} {'peak MiB':>9}")
        for name, kind, make in cases:
            if args.cases and not any(c in name for c in args.cases):
                continue
            path = make()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.monotonic()
            try:
                done = subprocess.run(
                    [args.python, "-c", CHILD, kind, str(path)],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                print(f"{name:<62} {'timed out':<26} {args.timeout:>8.1f} {'':>9}")
                continue
            wall = time.monotonic() - start
            if done.returncode == 0:
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{name:<62} {r['outcome']:<26} {r['seconds']:>8.3f} {r['peak_mib']:>9.0f}")
            else:
                # Aborted or killed (a negative code is the signal): its peak RSS is known
                # only when it rose above every earlier child's.
                peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                shown = f"{peak / 1024:.0f}" if peak > before else "?"
                print(f"{name:<62} {f'died (exit {done.returncode})':<26} {wall:>8.1f} {shown:>9}")


if __name__ == "__main__":
    main()
