"""Model downloads from a local HTTP server on loopback: verified, atomic, cancellable, plain errors."""

import hashlib
import threading

import pytest

from CDMSegmentLib.core.download import download_model, model_file
from CDMSegmentLib.core.errors import Cancelled, ModelFileError

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB: several chunks


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
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_is_verified_and_reports_bytes(server, tmp_path):
    cache = tmp_path / "cache"
    reports = []
    path = download_model(_entry(f"{server}/model.pt"), cache, progress=lambda d, t: reports.append((d, t)))
    assert path == cache / "remote.pt" and path.read_bytes() == PAYLOAD
    assert reports[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(reports) >= 2
    assert _leftovers(cache) == ["remote.pt"]


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
