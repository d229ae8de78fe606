"""The examples run as users run them, on the default model; the notebook's code cells run
in order, and the notebook keeps the outputs of such a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from _run_notebook import run  # noqa: E402


@pytest.mark.parametrize(
    ("script", "expect"),
    [("quickstart.py", "time to first token"), ("batch.py", "tok/s over 8 requests"), ("walkthrough.py", "")],
)
def test_example_runs(model_path, script: str, expect: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout


def test_notebook_runs_and_keeps_its_outputs(model_path) -> None:
    path = EXAMPLES / "notebook.ipynb"
    outputs = run(path)
    assert all(outputs), "every code cell prints something"
    assert "GFLOP/s" in outputs[3] and "not applicable here" in outputs[3]
    stored = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert len(stored) == len(outputs)
    assert all(c["outputs"] and c["execution_count"] for c in stored)


class _Kernel:
    """What IPython's ``get_ipython()`` returns inside a Jupyter kernel."""

    def __init__(self) -> None:
        self.config = {"IPKernelApp": {}}


def test_notebook_progress_is_a_widget_only_with_ipywidgets(monkeypatch):
    """In a notebook: tqdm's widget where ipywidgets is installed; where it is not, the
    text bar, with no "IProgress not found" warning (warnings are errors here)."""
    import importlib.util
    import types

    from tqdm.notebook import tqdm as widget_bar
    from tqdm.std import tqdm as text_bar

    from cortex import _progress

    assert _progress._bar_class() is text_bar  # not in a notebook
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = _Kernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "ipywidgets" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert _progress._bar_class() is text_bar
    bar = _progress.progress_bar(10, "loading", "layer")
    bar.update(10)
    bar.close()
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    if real_find_spec("ipywidgets") is None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert _progress._bar_class() is widget_bar
