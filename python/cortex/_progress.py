"""Progress bars for slow steps (downloads, conversion, loading), and running a Rust step on
a worker thread while one is drawn."""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from . import _core

T = TypeVar("T")


def progress_bar(total: int, desc: str, unit: str, unit_scale: bool = False) -> Any:
    """A ``tqdm.auto`` bar (a widget in Jupyter, text in a terminal) that appears only once
    the step has taken 0.5 s, and leaves nothing behind when it closes."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, delay=0.5, leave=False)


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
