"""Hub downloads against a real HTTP server on 127.0.0.1 that serves the Hub's file API
(``/api/models/{repo}/revision/{rev}`` and ``/{repo}/resolve/{commit}/{file}``, with
ranges) for a tiny model written by the test (RELIABILITY C7-C14)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
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


class HubServer:
    """Serves one repo (`org/tiny`) from a folder; faults are switched on per test."""

    def __init__(self, folder: Path) -> None:
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.corrupt: set[str] = set()  # serve wrong bytes (same size) for these
        self.cut: set[str] = set()  # send half of these, then drop the connection (once)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                if self.path.startswith("/api/models/org/tiny/revision/"):
                    body = json.dumps({"sha": COMMIT, "siblings": server.siblings()}).encode()
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
                data = server.files[name]
                if name in server.corrupt:
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.cut:
                    server.cut.discard(name)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def siblings(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for name, data in self.files.items():
            if name.endswith(".safetensors"):  # weights are LFS files
                lfs = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                out.append({"rfilename": name, "size": len(data), "lfs": lfs})
            else:
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                out.append({"rfilename": name, "size": len(data), "blobId": blob})
        return out

    def downloads(self) -> list[str]:
        return [p for p, _ in self.requests if "/resolve/" in p]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, dict]]:
    weights = write_tiny_hf(tmp_path / "repo", tokenizer="word")
    server = HubServer(tmp_path / "repo")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
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
    assert len(server.downloads()) == len(server.files)
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
    assert server.requests and all(h.get("Authorization") == "Bearer hf_secret" for _, h in server.requests)


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
    ranged = [h.get("Range") for p, h in server.requests if p.endswith(shard)]
    assert ranged[-1] and ranged[-1] != "bytes=0-"  # resumed, not restarted
    model = cortex.load_model(snapshot)
    np.testing.assert_allclose(
        model.forward(IDS, all_positions=True), forward(weights, family(), IDS), rtol=1e-4, atol=1e-5
    )


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
