"""What writing every output shares: atomic publish and JSON writes, folder locks, checksums, and the
package versions a manifest records (the manifests themselves: ``runs.RunManifest``)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no folder locks; the job store's lease still guards a job
    fcntl = None

_PACKAGES = ("age-explorer", "torch", "diffusers", "transformers", "safetensors", "numpy")


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temp file onto ``path``, readable by all like any ordinary file (mkstemp makes 0600)."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextmanager
def folder_lock(folder: str | Path, busy: str, wait: float = 10.0):
    """Hold ``folder`` (its ``.lock`` file) for one process, or raise ``RuntimeError(busy)`` after
    ``wait`` seconds. The kernel drops the lock when the holder dies, even by SIGKILL; the short wait
    lets a holder that is just finishing exit."""
    if fcntl is None:
        yield
        return
    fd = os.open(Path(folder) / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(busy) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON to a temp file in the same folder and rename it, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
