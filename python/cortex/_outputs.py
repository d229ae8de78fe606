"""Finished-output bookkeeping for the converter: atomic publishing of an output folder, the
checks that reuse or refuse what a name already holds, and the cache of earlier conversions
(``conversion_cache.json``). None of it looks inside a model: that is Rust's job
(``cortex._core.convert``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` (``.NAME.tmp-PID-X``) to build into, renamed to
    ``out`` when the block ends without an exception and removed when it raises.

    Replacing an earlier output takes two renames (POSIX cannot swap two folders in one):
    the earlier one is moved aside (``.NAME.old-PID-X``) and deleted only once the new one
    holds the name. An exception between them puts the earlier one back at once; a process
    killed there leaves it aside, and the next conversion restores it
    (:func:`restore_interrupted_swap`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore_interrupted_swap(out: Path) -> None:
    """Puts back the earlier output that a conversion killed between its two renames had
    moved aside (``.NAME.old-PID-X``, complete, its process gone) while nothing holds
    ``out``; the newer, unfinished attempt is then an ordinary stale temporary."""
    if out.exists() or out.is_symlink():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.old-(\d+)-[0-9a-f]+$")
    aside = []
    for path in out.parent.iterdir() if out.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            aside.append(path)
    if aside:
        # One at most in practice; were there several, the latest moved aside is newest.
        os.replace(max(aside, key=lambda p: p.stat().st_mtime_ns), out)


def remove_stale_temporaries(out: Path) -> None:
    """Removes temporaries (``.NAME.tmp-PID-X`` being built, ``.NAME.old-PID-X`` being
    replaced) of earlier conversions to ``out`` whose process is gone: a conversion killed
    with SIGKILL cannot clean up after itself."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for tmp in out.parent.iterdir():
        match = pattern.match(tmp.name)
        if match and not _process_alive(int(match.group(2))):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def check_existing(out: Path, wanted: dict[str, Any], reuse: bool) -> tuple[bool, str, Path | None] | None:
    """What ``out`` already holds, as a ``convert_model`` answer: None when it is free (or
    holds this same conversion and ``reuse`` is off), ``(True, ...)`` to reuse this same
    conversion, ``(False, ...)`` to refuse anything else. ``wanted``: the fields of
    ``conversion.json`` that make two conversions the same."""
    if not out.exists():
        return None
    record_path = out / "conversion.json"
    if not record_path.is_file():
        return False, f"{out} exists and is not a Cortex conversion; choose another output name", None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False, f"{out} has an unreadable conversion.json; remove it or choose another name", None
    mismatch = [f"{k} {record.get(k)!r} (wanted {v!r})" for k, v in wanted.items() if record.get(k) != v]
    if mismatch:
        return (
            False,
            f"{out} already holds a different conversion: {', '.join(mismatch)}; choose another output name",
            None,
        )
    if not reuse:
        return None
    if not (out / "config.json").is_file():
        return False, f"{out} is incomplete (no config.json); remove it", None
    return True, f"Using the cached conversion at {out}", out


class ConversionCache:
    """``conversion_cache.json`` in ``cache_dir``: a key (source and settings) → the output
    it was converted to, so a conversion under any name is found again."""

    def __init__(self, cache_dir: Path):
        self.cache_dir, self.path = cache_dir, cache_dir / "conversion_cache.json"

    @staticmethod
    def key(wanted: dict[str, Any]) -> str:
        """The key of a conversion's ``wanted`` fields (see :func:`check_existing`):
        ``source|recipe|group_size|bits_override|output_format``."""
        return "|".join("" if v is None else str(v) for v in wanted.values())

    def get(self, wanted: dict[str, Any]) -> Path | None:
        entry = self._read().get(self.key(wanted))
        return Path(entry["path"]) if isinstance(entry, dict) and "path" in entry else None

    def remember(self, wanted: dict[str, Any], out: Path) -> None:
        cache = self._read()
        cache[self.key(wanted)] = {"path": str(out), "created": time.time()}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def records(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """``(folder, conversion.json)`` of every finished output in the cache directory."""
        for d in sorted(self.cache_dir.iterdir()) if self.cache_dir.is_dir() else []:
            try:
                if not d.name.startswith("."):
                    yield d, json.loads((d / "conversion.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
