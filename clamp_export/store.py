"""The calibration artifact store: content-addressed entries under ``calib/`` (DESIGN §1).

``ROOT/KIND/MODEL/KEY/`` holds one entry: Stage 1 sets (``synth``) and searched parameters
(``qparams``) alike. The key is a hash of everything that decides the entry's content, so an
entry never needs invalidating: a different recipe is a different key.

An entry is written in a temporary folder beside its place, every file and the folder fsynced,
then renamed into place: a killed writer leaves no entry. Two writers of one key race on that
rename; the first wins, the second finds the place taken and keeps the winner's entry (both
wrote the same content). A reader that cannot read an entry treats it as a miss, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from clamp_export import atomic

T = TypeVar("T")


def recipe_key(recipe: dict) -> str:
    """sha256 of a JSON recipe (sorted keys): the entry's name, 16 hex digits."""
    blob = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Store:
    def __init__(self, root: Path | str, kind: str) -> None:
        self.root, self.kind = Path(root), kind

    def folder(self, model: str, key: str) -> Path:
        return self.root / self.kind / model / key

    def load(self, model: str, key: str, read: Callable[[Path], T], log) -> T | None:
        """``read(folder)`` of the entry, or None when there is none or it is unreadable.

        An unreadable entry is moved aside (``.corrupt-KEY-*``), so the next save can replace it.
        """
        folder = self.folder(model, key)
        if not folder.is_dir():
            return None
        try:
            return read(folder)
        except Exception as e:  # a corrupt entry is a miss, never a crash
            log(
                f"warning: stored {self.kind} entry {folder} is unreadable ({type(e).__name__}); "
                "computing it again"
            )
            aside = tempfile.mkdtemp(dir=folder.parent, prefix=f".corrupt-{key}-")
            with contextlib.suppress(OSError):  # another reader may have moved it first
                os.replace(folder, Path(aside) / key)
            return None

    def save(self, model: str, key: str, write: Callable[[Path], None]) -> Path:
        """Write an entry with ``write(tmp_folder)`` and publish it whole; returns its folder."""
        folder = self.folder(model, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
        try:
            write(tmp)
            for f in tmp.iterdir():
                atomic.fsync_file(f)
            atomic.fsync_dir(tmp)
            try:
                os.rename(tmp, folder)  # refused onto a non-empty folder
            except OSError:
                if not folder.is_dir():
                    raise
                # another writer of this key won the race: its entry, of the same content, stands
            else:
                atomic.fsync_dir(folder.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
