"""Downloads from the Hugging Face Hub into the standard Hugging Face cache.

``cortex.load("org/name")`` and ``MLXConverter().convert_model("org/name")`` come here when
the repo id is not a local path. The cache layout is huggingface_hub's (``models--org--name``
with ``blobs/``, ``snapshots/<commit>/`` and ``refs/<revision>``), so files fetched by
either tool serve the other.

Environment: ``HF_ENDPOINT``, ``HF_TOKEN`` (or ``$HF_HOME/token``), ``HF_HUB_OFFLINE``
(cache only; zero requests), ``HF_HUB_CACHE`` / ``HF_HOME``, and
``MAX_CONCURRENT_DOWNLOADS`` (default 8 files at once).

Every file is checked against the size the Hub lists and its checksum (sha256 for LFS
files, the git blob id for the others) before it enters the cache; a download is written
to ``<blob>.incomplete`` and only renamed into place once complete and checked, and an
interrupted one is resumed (or restarted when the server ignores the range) on the next
call.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._progress import progress_bar
from .exceptions import CortexError

__all__ = [
    "CacheError",
    "EntryNotFoundError",
    "HubError",
    "LocalEntryNotFoundError",
    "hf_cache_dir",
    "is_repo_id",
    "snapshot_download",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files a model folder needs besides its weights (each fetched when the repo has it).
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_CHUNK = 1 << 20


class HubError(CortexError):
    """A download from the Hub failed (network, HTTP status, or a bad answer)."""


class EntryNotFoundError(HubError, FileNotFoundError):
    """The repo, revision or file does not exist on the Hub (HTTP 404)."""


class LocalEntryNotFoundError(HubError, FileNotFoundError):
    """Offline (or the Hub unreachable) and the cache does not hold what is needed."""


class CacheError(HubError):
    """A downloaded file does not match what the Hub lists (size or sha256); it was
    discarded."""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(home).expanduser() / "hub"


def is_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _request(url: str, headers: dict[str, str] | None = None) -> Any:
    """Opens ``url`` with the token; HTTP errors become Hub errors that say what to do."""
    h = dict(headers or {})
    token = _token()
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.setdefault("User-Agent", "cortex")
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise EntryNotFoundError(f"not found on the Hub: {url}") from None
        if e.code in (401, 403):
            raise HubError(
                f"access denied to {url} (HTTP {e.code}): for a gated or private repo, accept its "
                "license on the Hub and set HF_TOKEN"
            ) from None
        raise HubError(f"HTTP {e.code} from {url}") from None


def _safe_name(name: str) -> str:
    """A repo file name that stays inside the snapshot folder."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"refusing file name {name!r}: it points outside the repo")
    return name


def _wanted(siblings: list[dict[str, Any]], filename: str | None) -> list[dict[str, Any]]:
    """The files to fetch: side files, then the weights (safetensors, else one GGUF —
    ``filename`` picks among several —, else PyTorch checkpoints)."""
    names = {s["rfilename"]: s for s in siblings}
    if filename is not None:
        if filename not in names:
            raise EntryNotFoundError(f"no file {filename!r} in the repo")
        weights = [filename]
    else:
        st = [n for n in names if n.endswith(".safetensors")]
        gguf = [n for n in names if n.endswith(".gguf")]
        pt = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
        if st:
            weights = st
        elif len(gguf) == 1:
            weights = gguf
        elif gguf:
            raise HubError(f"several GGUF files in the repo ({', '.join(sorted(gguf))}); pass filename=")
        else:
            weights = pt
    if not weights:
        raise HubError("the repo has no model weights (.safetensors, .gguf or pytorch_model.bin)")
    return [names[n] for n in list(_SIDE_FILES) + sorted(weights) if n in names]


def _fetch(url: str, blob: Path, size: int, sha256: str | None, name: str, bar: Any) -> None:
    """Downloads ``url`` into ``blob`` through ``blob.incomplete``, resuming a previous
    partial download, and checks size and checksum before renaming it into place."""
    part = blob.with_name(blob.name + ".incomplete")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with _request(url, headers) as resp:
            if have and resp.status != 206:
                have = 0  # the server ignored the range: start over, never append
            with open(part, "ab" if have else "wb") as out:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
    except (http.client.IncompleteRead, urllib.error.URLError, ConnectionError, TimeoutError) as e:
        # What arrived stays in `.incomplete`; the size check below reports the rest.
        if isinstance(e, http.client.IncompleteRead) and part.exists():
            with open(part, "ab") as out:
                out.write(e.partial)
    got = part.stat().st_size if part.exists() else 0
    if got != size:
        # Short: keep it to resume next time. Long: it cannot be right.
        if got > size:
            part.unlink()
        raise HubError(f"{name}: received {got} of {size} bytes; run again to resume")
    # LFS files carry their sha256; the others their git blob id, sha1("blob <size>\0" + data).
    if sha256 is not None:
        digest, want = hashlib.sha256(), sha256
    else:
        digest, want = hashlib.sha1(b"blob %d\0" % size), blob.name
    with open(part, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != want:
        part.unlink()
        raise CacheError(f"checksum mismatch for {name}: the download was discarded")
    os.replace(part, blob)


def _link(snapshot: Path, name: str, blob: Path) -> None:
    target = snapshot / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:  # no symlinks (some Windows setups): a copy serves as well
        import shutil

        shutil.copyfile(blob, target)


def _cached_snapshot(repo: Path, revision: str, filename: str | None) -> Path:
    """The cached snapshot of ``revision``, checked for completeness."""
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise LocalEntryNotFoundError(
            f"{repo.name} at revision {revision!r} is not in the cache ({repo.parent}) and the Hub "
            "cannot be asked (offline or unreachable)"
        )
    missing = []
    if filename is not None and not (snapshot / filename).exists():
        missing.append(filename)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (snapshot / index).is_file():
            shards = set(json.loads((snapshot / index).read_text()).get("weight_map", {}).values())
            missing += sorted(s for s in shards if not (snapshot / _safe_name(s)).exists())
    if missing:
        raise LocalEntryNotFoundError(
            f"the cached snapshot {snapshot} is incomplete; missing: {', '.join(missing)}"
        )
    return snapshot


def snapshot_download(repo_id: str, revision: str = "main", filename: str | None = None) -> Path:
    """Fetches what a model needs from ``repo_id`` at ``revision`` (branch, tag or commit)
    and returns its snapshot folder in the Hugging Face cache. Files already cached are not
    fetched again. Offline, or when the Hub cannot be reached, the cached snapshot is used
    if it is complete."""
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a repo id (org/name)")
    if "/" in revision or ".." in revision:
        revision = urllib.parse.quote(revision, safe="")
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if _offline():
        return _cached_snapshot(repo, revision, filename)
    url = f"{_endpoint()}/api/models/{repo_id}/revision/{revision}?blobs=true"
    try:
        with _request(url) as resp:
            info = json.load(resp)
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return _cached_snapshot(repo, revision, filename)
    commit = str(info.get("sha") or "")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise HubError(f"the Hub gave no commit for {repo_id}@{revision}")
    files = _wanted(list(info.get("siblings") or []), filename)
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    jobs = []
    for f in files:
        name = _safe_name(str(f["rfilename"]))
        lfs = f.get("lfs") or {}
        size = int(lfs.get("size", f.get("size", -1)))
        sha = lfs.get("sha256")
        blob_id = sha or f.get("blobId")
        if size < 0 or not blob_id or not re.fullmatch(r"[0-9a-f]{40,64}", str(blob_id)):
            raise HubError(f"the Hub listed {name} without a size and blob id")
        blob = blobs / str(blob_id)
        if not (blob.is_file() and blob.stat().st_size == size):
            jobs.append((name, blob, size, sha))
        else:
            _link(snapshot, name, blob)

    if jobs:
        bar = progress_bar(sum(j[2] for j in jobs), f"downloading {repo_id}", "B", unit_scale=True)
        quoted = urllib.parse.quote
        try:
            workers = max(1, int(os.environ.get("MAX_CONCURRENT_DOWNLOADS", "8")))
            with ThreadPoolExecutor(workers) as pool:
                futures = []
                for name, blob, size, sha in jobs:
                    url = f"{_endpoint()}/{repo_id}/resolve/{commit}/{quoted(name)}"
                    futures.append((name, blob, pool.submit(_fetch, url, blob, size, sha, name, bar)))
                for name, blob, future in futures:
                    future.result()
                    _link(snapshot, name, blob)
        finally:
            if bar is not None:
                bar.close()
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if revision != commit:
        ref.write_text(commit)
    return snapshot


def resolve(source: str, revision: str = "main", filename: str | None = None) -> Path:
    """A local path as it is, or a repo id fetched (or found in the cache)."""
    path = Path(source).expanduser()
    if path.exists() or not _REPO_ID.match(source):
        return path
    return snapshot_download(source, revision, filename)
