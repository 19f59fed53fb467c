"""Model downloads from a local HTTP server on loopback: verified, atomic, cancellable, plain errors,
one process at a time."""

import hashlib
import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from CDMSegmentLib.core.download import download_model, download_needed, model_file
from CDMSegmentLib.core.errors import Cancelled, ModelFileError

PAYLOAD = b"PK\x03\x04" + bytes(range(256)) * 8192  # 2 MiB, starting like a zip (a TorchScript file): several chunks
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"


@pytest.fixture
def server(http_server):
    (http_server.directory / "model.pt").write_bytes(PAYLOAD)
    return http_server.url


def _entry(url, **changes):
    entry = {"name": "remote", "file": "remote.pt", "url": url, "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
             "size_bytes": len(PAYLOAD), "kind": "diffusion"}
    entry.update(changes)
    return entry


def _leftovers(cache):
    """Files left in the cache, the download lock aside (it stays, as pip's and huggingface_hub's do)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def test_download_is_verified_and_reports_bytes(server, tmp_path):
    cache = tmp_path / "cache"
    reports = []
    path = download_model(_entry(f"{server}/model.pt"), cache, progress=lambda d, t: reports.append((d, t)))
    assert path == cache / "remote.pt" and path.read_bytes() == PAYLOAD
    assert reports[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(reports) >= 2
    assert _leftovers(cache) == ["remote.pt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_a_downloaded_model_gets_the_mode_of_any_new_file_not_the_temporary_files_0600(server, tmp_path, umask,
                                                                                        mode):
    previous = os.umask(umask)
    try:
        path = download_model(_entry(f"{server}/model.pt"), tmp_path / "cache")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_cached_file_is_not_downloaded_again(server, tmp_path):
    cache = tmp_path / "cache"
    download_model(_entry(f"{server}/model.pt"), cache)
    path = download_model(_entry("http://127.0.0.1:9/unreachable"), cache)
    assert path.read_bytes() == PAYLOAD


def test_a_wrong_sha256_keeps_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError, match="does not match its SHA256"):
        download_model(_entry(f"{server}/model.pt", sha256="0" * 64), cache)
    assert _leftovers(cache) == []


def test_a_short_file_keeps_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError, match="incomplete"):
        download_model(_entry(f"{server}/model.pt", size_bytes=len(PAYLOAD) + 1), cache)
    assert _leftovers(cache) == []


def test_cancel_keeps_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    cancel = threading.Event()

    def progress(done, total):
        cancel.set()

    with pytest.raises(Cancelled):
        download_model(_entry(f"{server}/model.pt"), cache, progress=progress, cancel=cancel)
    assert _leftovers(cache) == []


def test_http_errors_and_no_network_say_what_to_do(server, tmp_path):
    with pytest.raises(ModelFileError, match="HTTP 404.*proxy.*Load from file"):
        download_model(_entry(f"{server}/missing.pt"), tmp_path / "cache")
    with pytest.raises(ModelFileError, match="ConnectionError.*Load from file"):
        download_model(_entry("http://127.0.0.1:9/model.pt"), tmp_path / "cache", timeout_s=2)
    assert _leftovers(tmp_path / "cache") == []


def test_model_file_prefers_the_bundled_copy(tmp_path):
    registry = tmp_path / "Models" / "models.json"
    registry.parent.mkdir()
    entry = _entry("http://example.invalid/remote.pt")
    assert model_file(entry, tmp_path / "cache", registry) == tmp_path / "cache" / "remote.pt"
    (registry.parent / "remote.pt").write_bytes(b"x")
    assert model_file(entry, tmp_path / "cache", registry) == registry.parent / "remote.pt"


class _Trouble(http.server.BaseHTTPRequestHandler):
    """/slow: the payload in 64 KiB pieces 50 ms apart; /stall: 1 KiB then nothing; /login: a proxy's HTML page;
    /text: a plain-text body."""

    def do_GET(self):
        if self.path == "/login":
            return self._send(b"<html><body>Please sign in to the proxy</body></html>", "text/html")
        if self.path == "/text":
            return self._send(b"Service temporarily unavailable" + bytes(len(PAYLOAD)), "application/octet-stream")
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/stall":
            self.wfile.write(PAYLOAD[:1024])
            self.wfile.flush()
            time.sleep(20)
            return
        for lo in range(0, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[lo:lo + (1 << 16)])
            self.wfile.flush()
            time.sleep(0.05)

    def _send(self, body: bytes, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def trouble():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trouble)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_two_processes_downloading_one_model_into_one_cache_leave_one_good_file(trouble, tmp_path):
    cache = tmp_path / "cache"
    script = ("import json, sys; from pathlib import Path; from CDMSegmentLib.core.download import download_model; "
              "print(download_model(json.loads(sys.argv[1]), Path(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR)}
    runs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(_entry(f"{trouble}/slow")), str(cache)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    assert (cache / "remote.pt").read_bytes() == PAYLOAD
    assert _leftovers(cache) == ["remote.pt"]


def test_cancel_during_a_stalled_download_is_honoured_at_once(trouble, tmp_path):
    cache = tmp_path / "cache"
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        download_model(_entry(f"{trouble}/stall"), cache, cancel=cancel, timeout_s=30)
    assert time.monotonic() - start < 5  # not the 30 s stall allowance, nor the server's 20 s silence
    assert _leftovers(cache) == []


def test_a_stalled_download_gives_up_after_its_allowance(trouble, tmp_path):
    with pytest.raises(ModelFileError, match="no data for 1 s.*Load from file"):
        download_model(_entry(f"{trouble}/stall"), tmp_path / "cache", timeout_s=1)
    assert _leftovers(tmp_path / "cache") == []


def test_a_bad_cached_file_of_the_right_size_is_removed_and_fetched_again_saying_where(server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "remote.pt").write_bytes(bytes(1 << 20) + PAYLOAD[1 << 20:])  # zeros first, as a race left it
    entry = _entry(f"{server}/model.pt")
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [entry]}))
    assert download_needed("remote", cache, registry) == entry  # the panel offers the download again
    messages = []
    path = download_model(entry, cache, log=messages.append)
    assert path.read_bytes() == PAYLOAD and download_needed("remote", cache, registry) is None
    assert len(messages) == 1 and str(cache / "remote.pt") in messages[0] and "SHA256" in messages[0]


@pytest.mark.parametrize("path, expected", [("/login", "sent a web page"), ("/text", "not a model file")])
def test_a_body_that_is_not_a_model_is_recognised(path, expected, trouble, tmp_path):
    with pytest.raises(ModelFileError, match=expected):
        download_model(_entry(f"{trouble}{path}"), tmp_path / "cache")
    assert _leftovers(tmp_path / "cache") == []


def test_an_unwritable_cache_is_explained(server, tmp_path):
    (tmp_path / "file").write_bytes(b"not a folder")
    with pytest.raises(ModelFileError, match="cannot write to the model cache .*CDMSEGMENT_CACHE"):
        download_model(_entry(f"{server}/model.pt"), tmp_path / "file" / "cache")
