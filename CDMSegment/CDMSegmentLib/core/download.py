"""Models listed in models.json with a URL: downloaded once into a cache folder, atomically, verified.

The file is streamed to a ``.partial-`` name beside its target and renamed only after its
size and SHA256 match the registry, so an interrupted or corrupted download never
leaves a file that looks complete. ``requests`` honours HTTPS_PROXY / HTTP_PROXY and
the system's certificate settings, which is what users behind a hospital proxy need.
"""

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

import requests

from .errors import Cancelled, ModelFileError
from .modelfile import REGISTRY_FILE, LoadedModel, default_model_name, load_model, read_registry

CHUNK_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """$CDMSEGMENT_CACHE, else ~/.cache/CDMSegment/models (Slicer passes its own cache path instead)."""
    return Path(os.environ.get("CDMSEGMENT_CACHE", Path.home() / ".cache" / "CDMSegment" / "models"))


def model_file(entry: dict, cache_dir: Path, registry: Path = REGISTRY_FILE) -> Path:
    """Where a registry entry's file is: bundled beside models.json, else in the download cache."""
    bundled = registry.parent / entry["file"]
    return bundled if bundled.is_file() or not entry.get("url") else Path(cache_dir) / entry["file"]


def _offline_message(entry: dict, reason: str) -> str:
    return (f"cannot download model {entry['name']} from {entry['url']} ({reason}); check the network connection "
            "or the proxy (HTTPS_PROXY), or download the file in a browser and use 'Load from file'")


def download_model(entry: dict, cache_dir: Path, *, progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[threading.Event] = None, timeout_s: float = 30.0) -> Path:
    """Fetch ``entry['url']`` into ``cache_dir`` unless a verified copy is there; returns its path.

    progress(bytes done, bytes total); cancel stops between chunks with Cancelled, leaving no file.
    """
    target = Path(cache_dir) / entry["file"]
    if target.is_file() and target.stat().st_size == entry.get("size_bytes", target.stat().st_size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(".partial-" + target.name)
    digest = hashlib.sha256()
    done = 0
    try:
        with requests.get(entry["url"], stream=True, timeout=timeout_s) as response:
            response.raise_for_status()
            total = int(entry.get("size_bytes") or response.headers.get("Content-Length") or 0)
            with open(partial, "wb") as f:
                for chunk in response.iter_content(CHUNK_BYTES):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("download cancelled; nothing was kept")
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        if "size_bytes" in entry and done != entry["size_bytes"]:
            raise ModelFileError(f"download of {entry['name']} is incomplete ({done} of {entry['size_bytes']} bytes); "
                                 "try again")
        if digest.hexdigest() != entry["sha256"]:
            raise ModelFileError(f"download of {entry['name']} does not match its SHA256 in models.json (got "
                                 f"{digest.hexdigest()[:12]}...); the server sent another file, try again later")
        os.replace(partial, target)
    except requests.HTTPError as e:
        raise ModelFileError(_offline_message(entry, f"HTTP {e.response.status_code}")) from None
    except requests.RequestException as e:
        raise ModelFileError(_offline_message(entry, type(e).__name__)) from None
    finally:
        if partial.exists():
            partial.unlink()
    return target


def _registered(name_or_path, cache_dir: Optional[Path], registry: Optional[Path]) -> Tuple[Optional[dict], Optional[Path]]:
    """(registry entry or None, where its file is or will be downloaded to)."""
    registry = registry or REGISTRY_FILE
    entry = next((e for e in read_registry(registry) if e["name"] == str(name_or_path)), None)
    return entry, entry and model_file(entry, cache_dir or default_cache_dir(), registry)


def download_needed(name_or_path, cache_dir: Optional[Path] = None, registry: Optional[Path] = None) -> Optional[dict]:
    """The registry entry of a model that must be downloaded before use, else None."""
    entry, path = _registered(name_or_path, cache_dir, registry)
    return entry if entry is not None and not path.is_file() else None


def fetch_model(name_or_path=None, kind: str = "diffusion", cache_dir: Optional[Path] = None,
                registry: Optional[Path] = None, progress=None, cancel=None) -> LoadedModel:
    """Load a registered model (bundled, or downloaded into the cache on first use) or a model file;
    None: the registry's default model of ``kind``. registry: models.json, the bundled one by default;
    progress and cancel apply to a download."""
    registry = registry or REGISTRY_FILE
    name_or_path = name_or_path or default_model_name(kind, registry)
    entry, path = _registered(name_or_path, cache_dir, registry)
    if entry is None:
        return load_model(name_or_path, kind, registry)
    if not path.is_file():
        path = download_model(entry, path.parent, progress=progress, cancel=cancel)
    return load_model(path, kind, registry, expected_sha256=entry["sha256"])
