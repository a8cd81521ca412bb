"""A run directory that only ever holds the artifacts of one run.

A run writes into ``OUT/.partial/``. Only when it succeeds are its files renamed into ``OUT``, and
every artifact an earlier run left there that this one did not write is removed: ``OUT`` never
mixes two runs, and a failed run leaves it as it was. ``manifest.json`` lists what belongs to the
run. A killed search's checkpoint stays in ``.partial/``, where ``--resume`` finds it. The run
holds an exclusive lock on ``OUT`` itself (no lock file), so two runs cannot interleave there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from clamp_export import atomic
from clamp_export.errors import UserError

CHECKPOINT = "search.ckpt"
MANIFEST = "manifest.json"
STAGING = ".partial"
# every file a command writes into a run directory; a successful run replaces or removes each
ARTIFACTS = (
    "qparams.json",
    "search.json",
    CHECKPOINT,
    "model.qdq.onnx",
    "model.engine",
    "report.json",
    "images.safetensors",
    "grid.png",
    "synth.json",
    MANIFEST,
)


class RunDir:
    """``with RunDir(out) as run:`` write to ``run.path(name)``, then ``run.commit()``."""

    def __init__(self, out: Path | str, resume: bool = False) -> None:
        self.out = Path(out)
        self.resume = resume
        self.staging = self.out / STAGING
        self._created = False
        self._copied = False  # the checkpoint came from OUT, where it stays
        self._lock_fd: int | None = None

    def __enter__(self) -> RunDir:
        self._created = not self.out.exists()
        atomic.ensure_writable_dir(self.out)
        self._lock_fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise UserError(
                f"another clamp-export run is writing to {self.out}; wait for it or use another --out"
            ) from None
        kept = self.staging / CHECKPOINT
        if self.resume and kept.is_file():
            self._clear_staging(keep=CHECKPOINT)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
            if self.resume and (self.out / CHECKPOINT).is_file():  # resume a finished run
                shutil.copyfile(self.out / CHECKPOINT, self.staging / CHECKPOINT)
                self._copied = True
        if self.resume and not (self.staging / CHECKPOINT).is_file():
            self.__exit__(UserError, None, None)
            raise UserError(
                f"nothing to resume: no {CHECKPOINT} in {self.out}; run without --resume"
            )
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> dict:
        """Move the staged files into ``OUT``, drop stale ones, and write the manifest."""
        staged = sorted(p.name for p in self.staging.iterdir() if p.is_file())
        manifest = {
            "schema": 1,
            "command": sys.argv,
            "files": {
                n: {
                    "sha256": atomic.sha256_file(self.staging / n),
                    "bytes": (self.staging / n).stat().st_size,
                }
                for n in staged
            },
        }
        atomic.write_json(self.staging / MANIFEST, manifest)
        for name in (*staged, MANIFEST):
            os.replace(self.staging / name, self.out / name)
        for name in ARTIFACTS:
            if name not in staged and name != MANIFEST:
                (self.out / name).unlink(missing_ok=True)
        atomic.fsync_dir(self.out)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest

    def _clear_staging(self, keep: str | None = None) -> None:
        for p in self.staging.iterdir():
            if p.name != keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock_fd is None:
            return
        if exc_type is not None and self.staging.is_dir():
            if (self.staging / CHECKPOINT).is_file() and not self._copied:  # keep what resumes
                self._clear_staging(keep=CHECKPOINT)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and not any(self.out.iterdir()):
            self.out.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None
