"""Runs a notebook's code cells in order in one namespace, as Jupyter would, and returns
each cell's printed output; with --write, stores those outputs in the notebook.

Run: python examples/_run_notebook.py examples/notebook.ipynb [--write]
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any


def run(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    namespace: dict[str, Any] = {"__name__": "__main__"}
    outputs = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
        outputs.append(buffer.getvalue())
    return outputs


def write_outputs(path: Path, outputs: list[str]) -> None:
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for n, (cell, text) in enumerate(zip(code, outputs), start=1):
        cell["execution_count"] = n
        cell["outputs"] = (
            [{"name": "stdout", "output_type": "stream", "text": text.splitlines(keepends=True)}]
            if text
            else []
        )
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1])
    results = run(target)
    if "--write" in sys.argv:
        write_outputs(target, results)
    print("".join(results))
