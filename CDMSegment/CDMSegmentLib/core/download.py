"""Models listed in models.json with a URL: downloaded once into a cache folder, atomically, verified.

The file is streamed to a ``.partial-`` name, unique per download, beside its target and renamed
only after its size and SHA256 match the registry, under a file lock that lets one process at a
time download a model, so an interrupted, corrupted or concurrent download never leaves a file
that looks complete. ``requests`` honours HTTPS_PROXY / HTTP_PROXY and
the system's certificate settings, which is what users behind a hospital proxy need.
"""

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import requests
import urllib3
from filelock import FileLock, Timeout

from .errors import Cancelled, ModelFileError
from .files import new_file_mode
from .model_description import ModelDescription, describe_model, sha256_of
from .registry import REGISTRY_FILE, default_cache_dir, default_model_name, read_registry

CHUNK_BYTES = 1 << 16
# Every connect and read waits at most this long, and Cancel is checked between them: a stalled server
# cannot hold a cancelled download for more than about a second. A stall is tolerated up to timeout_s.
SOCKET_TIMEOUT_S = 0.5
LOCK_POLL_S = 0.2
ZIP_MAGIC = b"PK\x03\x04"  # a TorchScript model file is a zip archive
_verified_files: Dict[tuple, str] = {}  # (path, size, mtime) -> SHA256, so the panel does not hash on every look


def model_file(entry: dict, cache_dir: Path, registry: Path = REGISTRY_FILE) -> Path:
    """Where a registry entry's file is: bundled beside models.json, else in the download cache."""
    bundled = registry.parent / entry["file"]
    return bundled if bundled.is_file() or not entry.get("url") else Path(cache_dir) / entry["file"]


def is_verified(path: Path, entry: dict) -> bool:
    """True when ``path`` exists and its SHA256 is the registry entry's (remembered while the file is unchanged)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified_files:
        _verified_files[key] = sha256_of(path)
    return _verified_files[key] == entry["sha256"]


def _offline_message(entry: dict, reason: str) -> str:
    return (f"cannot download model {entry['name']} from {entry['url']} ({reason}); check the network connection "
            "or the proxy (HTTPS_PROXY), or download the file in a browser and use 'Load from file'")


def _cache_message(folder: Path, error: OSError) -> str:
    return (f"cannot write to the model cache {folder} ({error.strerror or error}); make it writable or choose "
            "another cache folder with the environment variable CDMSEGMENT_CACHE (the panel, the Python console and "
            "the command line share it)")


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("download cancelled; nothing was kept")


def download_model(entry: dict, cache_dir: Path, *, progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[threading.Event] = None, timeout_s: float = 30.0,
                   log: Callable[[str], None] = print) -> Path:
    """Fetch ``entry['url']`` into ``cache_dir`` unless a verified copy is there; returns its path.

    One process at a time per model (a file lock beside it: two Slicer windows, or the panel and a script).
    A cached copy failing its SHA256 is removed and fetched again, saying so. progress(bytes done, bytes
    total); cancel is honoured within about a second, waiting for the lock included, leaving no file.
    timeout_s: how long the server may send nothing before the download is given up.
    """
    target = Path(cache_dir) / entry["file"]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target.with_name(target.name + ".lock")))
        while True:
            _check_cancel(cancel)
            try:
                lock.acquire(timeout=LOCK_POLL_S)
                break
            except Timeout:
                continue
    except OSError as e:
        raise ModelFileError(_cache_message(target.parent, e)) from None
    try:
        if target.is_file():
            if is_verified(target, entry):
                return target  # another process may just have downloaded it
            target.unlink()
            log(f"the cached model file {target} failed its SHA256 check; removed it and downloading it again")
        return _download_locked(entry, target, progress, cancel, timeout_s)
    except OSError as e:
        raise ModelFileError(_cache_message(target.parent, e)) from None
    finally:
        lock.release()


def _download_locked(entry: dict, target: Path, progress, cancel, timeout_s: float) -> Path:
    fd, name = tempfile.mkstemp(prefix=".partial-", suffix="-" + target.name, dir=target.parent)
    partial = Path(name)
    os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; a shared cache must be readable like any new file
    try:
        with os.fdopen(fd, "wb") as f:
            digest, done = _stream(entry, f, progress, cancel, timeout_s)
        if "size_bytes" in entry and done != entry["size_bytes"]:
            raise ModelFileError(f"download of {entry['name']} is incomplete ({done} of {entry['size_bytes']} bytes); "
                                 "try again")
        if digest.hexdigest() != entry["sha256"]:
            raise ModelFileError(f"download of {entry['name']} does not match its SHA256 in models.json (got "
                                 f"{digest.hexdigest()[:12]}...); the server sent another file, try again later")
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def _stream(entry: dict, f, progress, cancel, timeout_s: float):
    """Write the body into ``f``, resuming (HTTP Range) after a stall or a dropped connection; -> (sha256, bytes)."""
    digest, done, furthest, stalled_since = hashlib.sha256(), 0, 0, None
    while True:
        _check_cancel(cancel)
        try:
            headers = {"Range": f"bytes={done}-"} if done else {}
            with requests.get(entry["url"], stream=True, timeout=SOCKET_TIMEOUT_S, headers=headers) as response:
                response.raise_for_status()
                if done and response.status_code != 206:  # the server cannot resume: start again
                    f.seek(0)
                    f.truncate()
                    digest, done = hashlib.sha256(), 0
                total = int(entry.get("size_bytes") or response.headers.get("Content-Length") or 0)
                for chunk in _chunks(response):
                    _check_cancel(cancel)
                    if done == 0:
                        _check_body(entry, response, chunk)
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if done > furthest:  # only new bytes end a stall: a server may resend its start and stop again
                        furthest, stalled_since = done, None
                    if progress:
                        progress(done, total)
            return digest, done
        except requests.HTTPError as e:
            raise ModelFileError(_offline_message(entry, f"HTTP {e.response.status_code}")) from None
        except (requests.Timeout, urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError):
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > timeout_s:
                raise ModelFileError(_offline_message(entry, f"no data for {timeout_s:.0f} s")) from None
        except requests.RequestException as e:
            raise ModelFileError(_offline_message(entry, type(e).__name__)) from None


def _chunks(response) -> Iterator[bytes]:
    """What arrives, as it arrives (read1: one socket read, at most SOCKET_TIMEOUT_S), never a full buffer's wait."""
    while True:
        chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
        if not chunk:
            return
        yield chunk


def _check_body(entry: dict, response, first: bytes) -> None:
    """A model file is a zip archive; a proxy's login page or a server's error page is not."""
    if first.startswith(ZIP_MAGIC):
        return
    if "html" in response.headers.get("Content-Type", "") or first.lstrip()[:1] == b"<":
        raise ModelFileError(f"{entry['url']} sent a web page, not the model file (a proxy's login page or an "
                             "error page?); open the address in a browser, sign in if asked, then try again, or "
                             "download the file there and use 'Load from file'")
    raise ModelFileError(f"{entry['url']} sent a file that is not a model file (it is not a TorchScript archive); "
                         "check the address, or download the file in a browser and use 'Load from file'")


def _registered(name_or_path, cache_dir: Optional[Path], registry: Optional[Path]) -> Tuple[Optional[dict], Optional[Path]]:
    """(registry entry or None, where its file is or will be downloaded to)."""
    registry = registry or REGISTRY_FILE
    entry = next((e for e in read_registry(registry) if e["name"] == str(name_or_path)), None)
    return entry, entry and model_file(entry, cache_dir or default_cache_dir(), registry)


def download_needed(name_or_path, cache_dir: Optional[Path] = None, registry: Optional[Path] = None) -> Optional[dict]:
    """The registry entry of a model that must be downloaded before use (absent, or a cached copy failing its
    SHA256), else None."""
    entry, path = _registered(name_or_path, cache_dir, registry)
    return entry if entry is not None and _to_download(entry, path, registry or REGISTRY_FILE) else None


def _to_download(entry: dict, path: Path, registry: Path) -> bool:
    """A model with a URL, not bundled, whose cached copy is absent or fails its SHA256."""
    return bool(entry.get("url")) and path.parent != registry.parent and not is_verified(path, entry)


def fetch_model(name_or_path=None, kind: str = "diffusion", cache_dir: Optional[Path] = None,
                registry: Optional[Path] = None, progress=None, cancel=None, log: Callable[[str], None] = print
                ) -> ModelDescription:
    """A registered model (bundled, or downloaded into the cache on first use) or a model file, described and
    checked without torch (model_description.describe_model; ``modelfile.load_network`` loads its network where
    it runs). None: the registry's default model of ``kind``. registry: models.json, the bundled one by default;
    progress and cancel apply to a download. Raises ModelFileError, or Cancelled."""
    registry = registry or REGISTRY_FILE
    name_or_path = name_or_path or default_model_name(kind, registry)
    entry, path = _registered(name_or_path, cache_dir, registry)
    if entry is None:
        return describe_model(name_or_path, kind, registry)
    if _to_download(entry, path, registry):
        path = download_model(entry, path.parent, progress=progress, cancel=cancel, log=log)
    return describe_model(path, kind, registry, expected_sha256=entry["sha256"])
