"""Writes that never leave a half-written file: write beside the target, fsync, then rename.

The file is fsynced before the rename and its folder after it, as git and SQLite do: a rename
alone can leave an empty file behind a crash on many filesystems.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from clamp_export.errors import UserError


def ensure_writable_dir(path: Path | str, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove it writable before any long work starts."""
    if not str(path).strip():  # before Path(), which reads "" as "."
        raise UserError(f"the {what} is an empty path; name a directory")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


def check_creatable_dir(path: Path | str, what: str) -> Path:
    """Refuse, without creating anything, a ``path`` that cannot become a writable directory."""
    if not str(path).strip():  # before Path(), which reads "" as "."
        raise UserError(f"the {what} is an empty path; name a directory")
    path = probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable ({probe} is read-only)")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it durably replaces ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
