"""Progress bars for slow steps (downloads, conversion, loading), and running a Rust step on
a worker thread while one is drawn."""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any, Callable, TypeVar

from . import _core

T = TypeVar("T")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython's terminal shell is not one)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar_class() -> Any:
    """tqdm's widget bar in a notebook that has ipywidgets; its text bar anywhere else.
    (``tqdm.auto`` would warn "IProgress not found" in a notebook without ipywidgets; text
    is what it falls back to anyway, so choosing it here says nothing.)"""
    if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    from tqdm.std import tqdm as text_tqdm

    return text_tqdm


def progress_bar(total: int, desc: str, unit: str, unit_scale: bool = False) -> Any:
    """A progress bar (a widget in a notebook with ipywidgets, text elsewhere) that appears
    only once the step has taken 0.5 s, and leaves nothing behind when it closes."""
    return _bar_class()(total=total, desc=desc, unit=unit, unit_scale=unit_scale, delay=0.5, leave=False)


def with_progress(desc: str, unit: str, step: Callable[[_core.Progress], T]) -> T:
    """Runs ``step(progress)`` (a Rust call that releases the GIL and reports to
    ``progress``) on a worker thread, drawing a bar from ``progress`` meanwhile. Ctrl-C
    cancels the step (it stops at its next unit) and is re-raised once it has stopped."""
    progress = _core.Progress()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(step(progress))
        except BaseException as e:  # re-raised on the calling thread
            failure.append(e)

    worker = threading.Thread(target=work, name=f"cortex-{desc}", daemon=True)
    worker.start()
    bar = None
    try:
        while worker.is_alive():
            worker.join(0.05)
            done, total = progress.get()
            if bar is None and total:
                bar = progress_bar(total, desc, unit)
            if bar is not None:
                bar.update(done - bar.n)
    except KeyboardInterrupt:
        progress.cancel()
        worker.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if failure:
        raise failure[0]
    return outcome[0]
