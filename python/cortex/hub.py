"""Downloads from the Hugging Face Hub into the standard Hugging Face cache.

``cortex.load("org/name")`` and ``MLXConverter().convert_model("org/name")`` come here when
the repo id is not a local path. The work is done in Rust (``src/hub/``) with the ``hf-hub``
crate, the GIL released. The cache layout is huggingface_hub's (``models--org--name`` with
``blobs/``, ``snapshots/<commit>/``, ``refs/<revision>`` and ``.locks/``), so files fetched
by either tool serve the other, and the two wait for each other's locks.

What is fetched: the model's side files (config, tokenizer, chat template, generation
config) and its weights, chosen as transformers and mlx-lm load them: the shards
``model.safetensors.index.json`` names, else ``model*.safetensors`` (never an adapter or a
``consolidated.safetensors`` beside them), else other safetensors, one GGUF (``filename=``
picks among several), or PyTorch checkpoints. ``allow_patterns`` (fnmatch) fetches exactly
the matching files instead; ``ignore_patterns`` excludes files either way.

Environment: ``HF_ENDPOINT``, ``HF_TOKEN`` (or the file ``HF_TOKEN_PATH`` names, or
``$HF_HOME/token``), ``HF_HUB_OFFLINE`` (cache only; zero requests), the cache folder
(see :func:`hf_cache_dir`), and ``MAX_CONCURRENT_DOWNLOADS`` (default 8 files at once).
The token is sent to the Hub only, never to the storage host a download is redirected to.

Every file is checked against the size the Hub lists and its checksum (sha256 for LFS
files, the git blob id for the others) before it enters the cache; a download is written
to ``<blob>.incomplete`` under the blob's lock and only renamed into place once complete
and checked, and an interrupted one is resumed (or restarted when the server ignores the
range) on the next call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from . import _core
from ._progress import with_progress
from .exceptions import CortexError

__all__ = [
    "CacheError",
    "EntryNotFoundError",
    "HubError",
    "LocalEntryNotFoundError",
    "hf_cache_dir",
    "is_repo_id",
    "resolve",
    "snapshot_download",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: One fnmatch pattern or several.
Patterns = Union[str, Sequence[str], None]


class HubError(CortexError):
    """A download from the Hub failed (network, HTTP status, or a bad answer)."""


class EntryNotFoundError(HubError, FileNotFoundError):
    """The repo, revision or file does not exist on the Hub (HTTP 404)."""


class LocalEntryNotFoundError(HubError, FileNotFoundError):
    """Offline (or the Hub unreachable) and the cache does not hold what is needed."""


class CacheError(HubError):
    """A downloaded file does not match the checksum the Hub lists (sha256 or git blob id);
    it was discarded. (A file of the wrong size is a cut download: ``HubError``, and the
    next call resumes it.)"""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it: ``$HF_HUB_CACHE``, else
    ``$HUGGINGFACE_HUB_CACHE`` (its old name), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    return _core.hub_cache_dir()


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def _patterns(patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def snapshot_download(
    repo_id: str,
    revision: str = "main",
    filename: str | None = None,
    *,
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
) -> Path:
    """Fetches what a model needs from ``repo_id`` at ``revision`` (branch, tag or commit)
    and returns its snapshot folder in the Hugging Face cache. Files already cached are not
    fetched again. Offline, when the Hub cannot be reached, or when it answers with an error
    other than a missing repo or revision (a 5xx, 429, 401/403), the cached snapshot is used
    if it is complete, as huggingface_hub does.

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag or commit.
        filename: the weights file to take (one GGUF among several); side files come too.
        allow_patterns: fnmatch patterns (``*`` crosses ``/``); when given, exactly the
            matching files are fetched, with no weight selection.
        ignore_patterns: files matching these are never fetched.

    Raises:
        EntryNotFoundError: the repo, revision or file does not exist (the Hub answers
            401 for a missing repo when no token is sent; the message says so).
        LocalEntryNotFoundError: offline or unreachable, and not cached completely.
        HubError: any other failure, the Hub's status in the message (a gated repo's says
            to accept its license and set ``HF_TOKEN``); when a cached snapshot could not
            stand in, its ``__cause__`` says why.
        CacheError: a file did not match its checksum and was discarded.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a repo id (org/name)")
    allow, ignore = _patterns(allow_patterns), _patterns(ignore_patterns)
    return with_progress(
        f"downloading {repo_id}",
        "MiB",
        lambda progress: _core.hub_snapshot_download(
            repo_id, revision, filename, allow, ignore, progress=progress
        ),
    )


def resolve(source: str, revision: str = "main", filename: str | None = None) -> Path:
    """A local path as it is, or a repo id fetched (or found in the cache)."""
    path = Path(source).expanduser()
    if path.exists() or not _REPO_ID.match(source):
        return path
    return snapshot_download(source, revision, filename)
