"""Fashion-MNIST from the IDX files the Debian package ``dataset-fashion-mnist`` installs.

Read with numpy alone so the loader works wherever the files are, gzipped or not.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from clamp_export.errors import UserError

DEFAULT_ROOT = Path(os.environ.get("CLAMP_EXPORT_FMNIST_ROOT", "/usr/share/datasets/fashion-mnist"))
INSTALL_HINT = "install it with: apt-get update && apt-get install -y dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}[.gz] not found under {root}; {INSTALL_HINT}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(
            f"{path} is truncated: its header names {ndim} dimensions but holds {len(raw)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(
            f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}"
        )
    return data.reshape(dims)


def load_fashion_mnist(
    split: str = "test", root: Path | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` ('train' or 'test')."""
    if split not in _FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise UserError(f"Fashion-MNIST not found at {root}; {INSTALL_HINT}")
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find(root, img_stem))
    labels = _read_idx(_find(root, lbl_stem)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels
