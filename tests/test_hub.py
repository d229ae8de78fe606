"""Hub downloads against real HTTP servers on the loopback interface that serve the Hub's
file API (``/api/models/{repo}/revision/{rev}?blobs=true``, ``HEAD`` and ``GET``
``/{repo}/resolve/{commit}/{file}`` with ranges, and the redirect of LFS files to a separate
storage host) for a tiny model written by the test (RELIABILITY C7-C16)."""

from __future__ import annotations

import _thread
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hf_models import family, write_tiny_hf
from numpy_reference import forward

import cortex
from cortex import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = [3, 1, 4, 1, 5, 9, 2, 6]


def _etag(name: str, data: bytes) -> str:
    """The Hub's blob name: sha256 for LFS files (weights here), the git blob id otherwise."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _request(handler: http.server.BaseHTTPRequestHandler) -> tuple[str, str, dict[str, str]]:
    """Method, path and headers (names lower-cased: HTTP clients differ in case)."""
    return handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Quiet; HEAD and GET both go to ``serve``, which each loopback server defines."""

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.serve(head=True)

    def do_GET(self) -> None:
        self.serve(head=False)

    def serve(self, head: bool) -> None:
        raise NotImplementedError


def _start(handler: type[_Handler]) -> http.server.ThreadingHTTPServer:
    """A loopback server on a free port, serving from a daemon thread."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _stop(httpd: http.server.ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()


class StorageServer:
    """The storage host LFS downloads are redirected to (``cdn-lfs.hf.co`` on the real Hub):
    serves ``/blob/<name>`` from the Hub server's files, and records every request."""

    def __init__(self, hub_server: HubServer, host: str) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        storage = self

        class Handler(_Handler):
            def serve(self, head: bool) -> None:
                storage.requests.append(_request(self))
                name = self.path.removeprefix("/blob/")
                if name not in hub_server.files:
                    self.send_error(404)
                    return
                hub_server.send_file(self, name, head)

        self.httpd = _start(Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        _stop(self.httpd)


class HubServer:
    """Serves one repo (`org/tiny`) from a folder; faults are switched on per test."""

    def __init__(self, folder: Path) -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.corrupt: set[str] = set()  # serve wrong bytes (same size) for these
        self.cut: set[str] = set()  # send half of these, then drop the connection (once)
        self.slow = 0.0  # seconds to pause halfway through every file body...
        self.slow_only: set[str] | None = None  # ...or through these files' only
        self.storage: StorageServer | None = None  # where LFS files are redirected, if set
        # Answer every request (or, with fail_files_only, every file request) with this
        # status and these headers instead.
        self.fail: tuple[int, dict[str, str]] | None = None
        self.fail_files_only = False
        self.ignore_range = False  # answer a ranged GET with the whole file (200)
        self.linked_size = False  # send X-Linked-Size (the whole size) with every file, as a proxy may
        # Hold file requests until this many listings have been asked for (or 30 s passed).
        self.gate = 0
        self.gate_opened: bool | None = None
        self.listings = 0
        self.cond = threading.Condition()
        server = self

        class Handler(_Handler):
            def serve(self, head: bool) -> None:
                server.requests.append(_request(self))
                if server.fail is not None and (not server.fail_files_only or "/resolve/" in self.path):
                    status, headers = server.fail
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "/resolve/" in self.path and server.gate:
                    with server.cond:
                        opened = server.cond.wait_for(lambda: server.listings >= server.gate, timeout=30)
                        server.gate_opened = opened and server.gate_opened is not False
                if self.path.startswith("/api/models/org/tiny/revision/") and not head:
                    with server.cond:
                        server.listings += 1
                        server.cond.notify_all()
                    listing = {"id": "org/tiny", "sha": COMMIT, "siblings": server.siblings()}
                    body = json.dumps(listing).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                prefix = f"/org/tiny/resolve/{COMMIT}/"
                name = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                if name not in server.files:
                    self.send_error(404)
                    return
                if server.storage is not None and name.endswith(".safetensors"):
                    # The Hub answers for LFS files with a redirect that carries the file's
                    # metadata; the bytes come from the storage host.
                    data = server.files[name]
                    self.send_response(302)
                    self.send_header("Location", f"{server.storage.url}/blob/{name}")
                    self.send_header("X-Linked-Etag", f'"{_etag(name, data)}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.send_file(self, name, head)

        self.httpd = _start(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def send_file(self, handler: http.server.BaseHTTPRequestHandler, name: str, head: bool) -> None:
        data = self.files[name]
        if name in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        if (rng := handler.headers.get("Range")) and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Length", str(len(data) - start))
        if self.linked_size:
            handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("ETag", f'"{_etag(name, self.files[name])}"')
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.end_headers()
        if head:
            return
        body = data[start:]
        if name in self.cut:
            self.cut.discard(name)
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.connection.close()
            return
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        if self.slow_only is None or name in self.slow_only:
            time.sleep(self.slow)
        handler.wfile.write(body[len(body) // 2 :])

    def siblings(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for name, data in self.files.items():
            if name.endswith(".safetensors"):  # weights are LFS files
                lfs = {"sha256": _etag(name, data), "size": len(data)}
                out.append({"rfilename": name, "size": len(data), "lfs": lfs})
            else:
                out.append({"rfilename": name, "size": len(data), "blobId": _etag(name, data)})
        return out

    def downloads(self) -> list[str]:
        """The file GETs (not the HEADs that ask about a file)."""
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]

    def stop(self) -> None:
        _stop(self.httpd)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, dict]]:
    weights = write_tiny_hf(tmp_path / "repo", tokenizer="word")
    server = HubServer(tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield server, weights
    server.stop()


def test_first_download_then_cache_hit_with_the_server_stopped(served, tmp_path: Path) -> None:
    server, weights = served
    model, tok = cortex.load("org/tiny")
    assert tok.encode("w5 w7") == [5, 7]
    np.testing.assert_allclose(
        model.forward(IDS, all_positions=True), forward(weights, family(), IDS), rtol=1e-4, atol=1e-5
    )
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / COMMIT
    assert (snapshot / "config.json").is_symlink()
    assert (tmp_path / "cache" / "models--org--tiny" / "refs" / "main").read_text() == COMMIT
    assert sorted(server.downloads()) == sorted(f"/org/tiny/resolve/{COMMIT}/{n}" for n in server.files)
    # Everything cached: the next call asks for the listing only.
    before = len(server.downloads())
    cortex.load_tokenizer("org/tiny")
    assert len(server.downloads()) == before
    server.stop()
    model2 = cortex.load_model("org/tiny")  # the Hub is unreachable: the cache serves
    np.testing.assert_array_equal(model2.forward(IDS), model.forward(IDS))


def test_offline_mode_opens_no_socket(served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = served
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.LocalEntryNotFoundError, match="not in the cache"):
        cortex.load("org/tiny")
    assert server.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cortex.load_model("org/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    count = len(server.requests)
    cortex.load_model("org/tiny")
    assert len(server.requests) == count


def test_token_is_sent_as_a_header(served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = served
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.snapshot_download("org/tiny")
    assert server.requests and {h.get("authorization") for _, _, h in server.requests} == {"Bearer hf_secret"}


def test_token_from_hf_token_path(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = served
    token_file = tmp_path / "elsewhere" / "token"
    token_file.parent.mkdir()
    token_file.write_text("hf_from_file\n")  # as `huggingface-cli login` writes it
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
    hub.snapshot_download("org/tiny")
    assert {h.get("authorization") for _, _, h in server.requests} == {"Bearer hf_from_file"}


def test_token_never_reaches_the_storage_host(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub redirects weight files to another host; the token is for the Hub only
    (127.0.0.1 and localhost are different hosts to an HTTP client)."""
    server, _ = served
    storage = StorageServer(server, host="localhost")
    server.storage = storage
    try:
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        snapshot = hub.snapshot_download("org/tiny")
        shards = [n for n in server.files if n.endswith(".safetensors")]
        assert shards and all((snapshot / n).read_bytes() == server.files[n] for n in shards)
        fetched = [p for m, p, _ in storage.requests if m == "GET"]
        assert sorted(fetched) == sorted(f"/blob/{n}" for n in shards)
        assert [h for _, _, h in storage.requests if "authorization" in h] == []
        assert all(h.get("authorization") == "Bearer hf_secret" for _, _, h in server.requests)
    finally:
        storage.stop()


def test_corrupted_blob_is_rejected(served, tmp_path: Path) -> None:
    server, _ = served
    shard = next(n for n in server.files if n.endswith(".safetensors"))
    server.corrupt.add(shard)
    with pytest.raises(hub.CacheError, match=f"checksum mismatch for {shard}"):
        hub.snapshot_download("org/tiny")
    repo = tmp_path / "cache" / "models--org--tiny"
    lfs = hashlib.sha256(server.files[shard]).hexdigest()
    assert not (repo / "blobs" / lfs).exists() and not (repo / "blobs" / (lfs + ".incomplete")).exists()
    assert not (repo / "snapshots" / COMMIT / shard).exists()
    server.corrupt.clear()
    assert (hub.snapshot_download("org/tiny") / shard).read_bytes() == server.files[shard]


def test_corrupted_small_file_is_rejected_by_its_git_blob_id(served) -> None:
    server, _ = served
    server.corrupt.add("config.json")
    with pytest.raises(hub.CacheError, match=r"checksum mismatch for config\.json"):
        hub.snapshot_download("org/tiny")
    server.corrupt.clear()
    snapshot = hub.snapshot_download("org/tiny")
    assert (snapshot / "config.json").read_bytes() == server.files["config.json"]


def test_cut_download_is_completed_on_the_next_call(served) -> None:
    server, weights = served
    shard = next(n for n in server.files if n.endswith(".safetensors"))
    server.cut.add(shard)
    with pytest.raises(hub.HubError, match="run again to resume"):
        hub.snapshot_download("org/tiny")
    snapshot = hub.snapshot_download("org/tiny")
    assert (snapshot / shard).read_bytes() == server.files[shard]
    ranged = [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith(shard)]
    assert len(ranged) == 2 and ranged[0] is None
    assert ranged[1].startswith(f"bytes={len(server.files[shard]) // 2}-")  # resumed, not restarted
    model = cortex.load_model(snapshot)
    np.testing.assert_allclose(
        model.forward(IDS, all_positions=True), forward(weights, family(), IDS), rtol=1e-4, atol=1e-5
    )


def test_ctrl_c_stops_promptly_and_the_next_call_resumes(served, tmp_path: Path) -> None:
    """Ctrl-C lands while the server is silent mid-file; the halves that arrived stay in
    `.incomplete` and the next call resumes them instead of fetching them again."""
    server, _ = served
    server.slow = 5.0
    server.slow_only = {n for n in server.files if n.endswith(".safetensors")}
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    interrupted_at: list[float] = []

    def press_ctrl_c() -> None:
        # Once both files' first halves are on disk (a file exists before its first bytes
        # arrive: pressing then would leave one with nothing to resume).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sizes = [f.stat().st_size for f in blobs.glob("*.incomplete") if f.exists()]
            if sum(1 for n in sizes if n > 0) == 2:
                break
            time.sleep(0.02)
        interrupted_at.append(time.monotonic())
        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        hub.snapshot_download("org/tiny")
    assert time.monotonic() - interrupted_at[0] < 1.0
    assert len(list(blobs.glob("*.incomplete"))) == 2
    server.slow = 0.0
    snapshot = hub.snapshot_download("org/tiny")
    for name, data in server.files.items():
        assert (snapshot / name).read_bytes() == data
    ranges = [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith(".safetensors")]
    assert len(ranges) == 4 and sum(1 for r in ranges if r and not r.startswith("bytes=0-")) == 2


def test_two_processes_fill_one_empty_cache(served, tmp_path: Path) -> None:
    """Both succeed with identical files, and each file crosses the network once: the
    second process waits on the first one's lock, then links its blob."""
    server, _ = served
    server.gate = 2  # no file is served before both processes have asked for the listing
    server.slow = 0.5  # and every file body pauses halfway, so the two overlap
    script = "import sys; from cortex import hub; print(hub.snapshot_download('org/tiny'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    snapshots = {Path(out.strip()) for out, _ in results}
    assert snapshots == {tmp_path / "cache" / "models--org--tiny" / "snapshots" / COMMIT}
    (snapshot,) = snapshots
    for name, data in server.files.items():
        assert (snapshot / name).read_bytes() == data
    assert sorted(server.downloads()) == sorted(f"/org/tiny/resolve/{COMMIT}/{n}" for n in server.files)
    assert not list((tmp_path / "cache" / "models--org--tiny" / "blobs").glob("*.incomplete"))
    assert server.gate_opened, "the two processes did not overlap"


def test_files_with_identical_contents_fetched_at_once(served, tmp_path: Path) -> None:
    """Two shards with the same bytes share one blob: the second waits for the first's
    lock instead of writing the same `.incomplete` at the same time."""
    server, _ = served
    server.slow = 0.3
    first, second = sorted(n for n in server.files if n.endswith(".safetensors"))
    server.files[second] = server.files[first]
    snapshot = hub.snapshot_download("org/tiny")
    assert (snapshot / first).read_bytes() == (snapshot / second).read_bytes() == server.files[first]
    assert os.path.realpath(snapshot / first) == os.path.realpath(snapshot / second)
    weight_gets = [p for p in server.downloads() if p.endswith(".safetensors")]
    assert len(weight_gets) == 1


def test_only_the_indexed_shards_are_fetched(served) -> None:
    """An adapter, Mistral's consolidated file and a stale shard beside an indexed model
    are left on the Hub (transformers and mlx-lm load neither)."""
    server, weights = served
    shards = sorted(n for n in server.files if n.endswith(".safetensors"))
    extras = ["consolidated.safetensors", "adapter_model.safetensors", "model-00003-of-00003.safetensors"]
    for i, name in enumerate(extras):
        server.files[name] = server.files[shards[i % len(shards)]] + bytes([i])
    snapshot = hub.snapshot_download("org/tiny")
    fetched = {p.rsplit("/", 1)[1] for p in server.downloads()}
    assert fetched == set(server.files) - set(extras)
    assert not any((snapshot / n).exists() for n in extras)
    model = cortex.load_model(snapshot)
    np.testing.assert_allclose(
        model.forward(IDS, all_positions=True), forward(weights, family(), IDS), rtol=1e-4, atol=1e-5
    )


def test_allow_and_ignore_patterns(served) -> None:
    server, _ = served
    snapshot = hub.snapshot_download("org/tiny", allow_patterns=["*.json"], ignore_patterns="tokenizer*")
    fetched = {p.rsplit("/", 1)[1] for p in server.downloads()}
    want = {n for n in server.files if n.endswith(".json") and not n.startswith("tokenizer")}
    assert fetched == want and "config.json" in want
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(want)
    # ignore_patterns alone narrows the usual selection.
    server.requests.clear()
    snapshot = hub.snapshot_download("org/tiny", ignore_patterns=["tokenizer.json"])
    fetched = {p.rsplit("/", 1)[1] for p in server.downloads()}
    assert "tokenizer.json" not in fetched and any(n.endswith(".safetensors") for n in fetched)
    with pytest.raises(ValueError, match="allow_patterns"):
        hub.snapshot_download("org/tiny", allow_patterns=["[unclosed"])


def test_names_outside_the_repo_are_refused(served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = served
    listing = server.siblings()
    listing.append({"rfilename": "../../evil.safetensors", "size": 1, "blobId": "a" * 40})
    monkeypatch.setattr(server, "siblings", lambda: listing)
    with pytest.raises(hub.HubError, match="outside the repo"):
        hub.snapshot_download("org/tiny")


def test_missing_repo_is_a_clear_error(served) -> None:
    with pytest.raises(hub.EntryNotFoundError, match="not found on the Hub"):
        hub.snapshot_download("org/absent")


def test_an_empty_file_is_downloaded(served) -> None:
    """A zero-byte file has nothing to fetch, but its blob must still be made and checked."""
    server, _ = served
    server.files["empty.txt"] = b""
    snapshot = hub.snapshot_download("org/tiny", allow_patterns="*")
    assert (snapshot / "empty.txt").read_bytes() == b""
    assert (snapshot / "empty.txt").resolve().name == hashlib.sha1(b"blob 0\0").hexdigest()
    assert (snapshot / "config.json").read_bytes() == server.files["config.json"]


@pytest.mark.parametrize("status", [500, 503, 429, 401, 403])
def test_hub_errors_fall_back_to_a_complete_cached_snapshot(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """As huggingface_hub: any HTTP error but a missing repo or revision lets the cache serve."""
    server, _ = served
    snapshot = hub.snapshot_download("org/tiny")
    server.fail = (status, {})
    assert hub.snapshot_download("org/tiny") == snapshot
    # Nothing cached: the Hub's error is raised, the cache miss as its cause.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(hub.HubError, match=f"HTTP {status}") as raised:
        hub.snapshot_download("org/tiny")
    assert not isinstance(raised.value, hub.LocalEntryNotFoundError)
    assert isinstance(raised.value.__cause__, hub.LocalEntryNotFoundError)
    assert "no complete cached snapshot" in str(raised.value)


def test_a_missing_revision_does_not_fall_back(served) -> None:
    server, _ = served
    hub.snapshot_download("org/tiny")
    server.fail = (404, {"X-Error-Code": "RevisionNotFound"})
    with pytest.raises(hub.EntryNotFoundError, match="not found on the Hub"):
        hub.snapshot_download("org/tiny")


def test_unreachable_and_not_cached_is_a_cache_miss(served) -> None:
    server, _ = served
    server.stop()
    with pytest.raises(hub.LocalEntryNotFoundError, match="not in the cache"):
        hub.snapshot_download("org/tiny")


def test_a_cached_call_writes_nothing(served, tmp_path: Path) -> None:
    """Links and refs that are right already are left alone: same inodes and mtimes, and,
    where permissions bind (not root), a read-only snapshot folder and refs still serve."""
    snapshot = hub.snapshot_download("org/tiny")
    ref = tmp_path / "cache" / "models--org--tiny" / "refs" / "main"
    paths = [ref, *sorted(snapshot.iterdir())]

    def stamps() -> list[tuple[int, int]]:
        return [(os.lstat(p).st_ino, os.lstat(p).st_mtime_ns) for p in paths]

    before = stamps()
    time.sleep(0.01)  # a rewrite would show in the mtime too
    assert hub.snapshot_download("org/tiny") == snapshot
    assert stamps() == before
    if os.geteuid() != 0:
        for folder in (snapshot, ref.parent):
            folder.chmod(0o555)
        try:
            assert hub.snapshot_download("org/tiny") == snapshot
        finally:
            for folder in (snapshot, ref.parent):
                folder.chmod(0o755)


def test_unauthenticated_missing_repo_is_not_found(served) -> None:
    """The Hub answers 401 for a repo that does not exist when no token is sent."""
    server, _ = served
    server.fail = (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
    with pytest.raises(hub.EntryNotFoundError, match=r"the repo org/tiny.*HF_TOKEN"):
        hub.snapshot_download("org/tiny")


def test_gated_repo_says_to_accept_the_license(served) -> None:
    """A gated repo's listing is public; its files answer 401/403 with GatedRepo."""
    server, _ = served
    server.fail = (403, {"X-Error-Code": "GatedRepo"})
    server.fail_files_only = True
    with pytest.raises(hub.HubError, match=r"gated repo.*license.*HF_TOKEN") as raised:
        hub.snapshot_download("org/tiny")
    assert not isinstance(raised.value, hub.EntryNotFoundError)


def _cut_then_resume(server: HubServer) -> tuple[str, list[str | None]]:
    shard = next(n for n in server.files if n.endswith(".safetensors"))
    server.cut.add(shard)
    with pytest.raises(hub.HubError, match="run again to resume"):
        hub.snapshot_download("org/tiny")
    return shard, [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith(shard)]


def test_a_server_that_ignores_the_range_restarts_the_file(served) -> None:
    server, _ = served
    shard, _ = _cut_then_resume(server)
    server.ignore_range = True
    snapshot = hub.snapshot_download("org/tiny")
    assert (snapshot / shard).read_bytes() == server.files[shard]
    ranges = [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith(shard)]
    assert len(ranges) == 2 and ranges[1] is not None  # asked for a range, got the whole file


def test_a_resume_through_a_proxy_sending_x_linked_size(served) -> None:
    """A 206 that carries X-Linked-Size (the whole size) is still the rest of the file."""
    server, _ = served
    shard, _ = _cut_then_resume(server)
    server.linked_size = True
    snapshot = hub.snapshot_download("org/tiny")
    assert (snapshot / shard).read_bytes() == server.files[shard]
    ranges = [h.get("range") for m, p, h in server.requests if m == "GET" and p.endswith(shard)]
    assert len(ranges) == 2 and ranges[1].startswith(f"bytes={len(server.files[shard]) // 2}-")


def test_cache_folder_from_the_environment(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_CACHE, then HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, then XDG_CACHE_HOME."""
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old-name"))
    assert hub.hf_cache_dir() == tmp_path / "cache"  # HF_HUB_CACHE wins
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub.hf_cache_dir() == tmp_path / "old-name"
    snapshot = hub.snapshot_download("org/tiny")
    assert snapshot == tmp_path / "old-name" / "models--org--tiny" / "snapshots" / COMMIT
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    assert hub.hf_cache_dir() == tmp_path / "hf_home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    snapshot = hub.snapshot_download("org/tiny")
    assert snapshot == tmp_path / "xdg" / "huggingface" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
