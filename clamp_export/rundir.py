"""A run directory that only ever holds artifacts that belong together, listed in its manifest.

Each command writes into ``OUT/.partial/``. Only when it succeeds are its files renamed into
``OUT``; then every artifact of its own stage and the stages after it that it did not write is
removed, since those were made from inputs it has just replaced. A failed command leaves ``OUT``
as it was. ``clamp-export MODEL`` starts at the first stage, so it replaces everything; a stage
command (``export``, ``build``, ...) keeps the artifacts of the stages before it, which let hand
-chained stages share one directory.

``manifest.json`` lists every artifact with its sha256, size, the stage that wrote it, the
hashes of that stage's inputs and its command; ``verify`` recomputes the hashes. A killed
search's checkpoint stays in ``.partial/``, where ``--resume`` finds it. A command holds an
exclusive lock on ``OUT`` itself (no lock file), so two commands cannot interleave there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from clamp_export import atomic
from clamp_export.errors import UserError

CHECKPOINT = "search.ckpt"
MANIFEST = "manifest.json"
STAGING = ".partial"
MANIFEST_SCHEMA = 1
STAGES = ("synth", "search", "export", "build", "report")
# every file a command writes into a run directory, and the stage that writes it
ARTIFACTS = {
    "images.safetensors": "synth",
    "grid.png": "synth",
    "synth.json": "synth",
    "qparams.json": "search",
    "search.json": "search",
    CHECKPOINT: "search",
    "model.qdq.onnx": "export",
    "model.fp32.onnx": "export",
    "model.fp16.onnx": "export",
    "model.engine": "build",
    "model.engine.json": "build",
    "model.fp16.engine": "build",
    "model.fp16.engine.json": "build",
    "report.json": "report",
    "report.md": "report",
    "report.html": "report",
}


class RunDir:
    """``with RunDir(out, "export") as run:`` write to ``run.path(name)``, then ``run.commit()``."""

    def __init__(self, out: Path | str, first_stage: str = STAGES[0], resume: bool = False) -> None:
        self.out = Path(out)
        self.first = STAGES.index(first_stage)
        self.resume = resume
        self.staging = self.out / STAGING
        self.inputs: dict[str, dict[str, str]] = {}  # artifact -> {input name: sha256}
        self.meta: dict = {}  # recorded at the top of the manifest (model, store keys, ...)
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
        if self.resume and (self.staging / CHECKPOINT).is_file():
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

    def existing(self, name: str) -> Path:
        """An artifact of an earlier stage in ``OUT`` (an input of this command)."""
        return self.out / name

    def record(self, name: str, inputs: dict[str, str]) -> None:
        """Say which inputs (name -> sha256) the staged artifact ``name`` was made from."""
        self.inputs[name] = inputs

    def commit(self) -> dict:
        """Move the staged files into ``OUT``, drop what they make stale, write the manifest."""
        from clamp_export.versions import versions  # imports the ML stack: only when writing

        staged = sorted(p.name for p in self.staging.iterdir() if p.is_file())
        previous = read_manifest(self.out, missing_ok=True)
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
        kept = previous if self.first > STAGES.index("search") else {}
        files = {
            name: entry
            for name, entry in previous.get("files", {}).items()
            if name not in staged and STAGES.index(ARTIFACTS.get(name, "report")) < self.first
        }
        for name in staged:
            files[name] = {
                "sha256": atomic.sha256_file(self.staging / name),
                "bytes": (self.staging / name).stat().st_size,
                "stage": ARTIFACTS.get(name, STAGES[self.first]),
                "inputs": self.inputs.get(name, {}),
                "command": command,
            }
        manifest = {
            "schema": MANIFEST_SCHEMA,
            # what made the parameters (model, seed, store, pipeline) holds until they change
            **{k: v for k, v in kept.items() if k not in ("schema", "files", "command")},
            **self.meta,
            "versions": versions(),
            "command": command,
            "files": dict(sorted(files.items())),
        }
        for name in staged:
            os.replace(self.staging / name, self.out / name)
        for name, stage in ARTIFACTS.items():
            if name not in files and STAGES.index(stage) >= self.first:
                (self.out / name).unlink(missing_ok=True)
        atomic.write_json(self.out / MANIFEST, manifest)
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


def read_manifest(run_dir: Path | str, missing_ok: bool = False) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return {}
        raise UserError(f"{run_dir} has no {MANIFEST}: it is not a clamp-export run directory")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no files listed")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is corrupt ({type(e).__name__}); re-run the command that made it"
        ) from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise UserError(
            f"{path} has schema {manifest.get('schema')!r}; this clamp-export writes "
            f"{MANIFEST_SCHEMA}: re-run the command that made it"
        )
    return manifest


def require(run_dir: Path | str, *names: str) -> None:
    """Refuse a run directory that lacks any of ``names``, naming the first missing file."""
    for name in names:
        if not (Path(run_dir) / name).is_file():
            stage = ARTIFACTS.get(name, "the pipeline")
            raise UserError(
                f"{run_dir} has no {name} (older or partial run directory); run "
                f"`clamp-export {stage}` into it, or the whole pipeline, first"
            )


def verify(run_dir: Path | str) -> list[str]:
    """One line per artifact of the manifest that is missing or whose bytes changed."""
    manifest = read_manifest(run_dir)
    problems = []
    for name, entry in manifest["files"].items():
        path = Path(run_dir) / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif atomic.sha256_file(path) != entry.get("sha256"):
            problems.append(
                f"{name}: sha256 differs from the manifest (modified since it was written)"
            )
    return problems
