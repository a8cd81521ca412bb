"""Evaluation and calibration inputs, already normalized for the model.

A source is ``fmnist`` / ``fmnist-train`` (the Debian IDX files), a folder of IDX files, a
class-folder of images, or a tensor file (.safetensors / .pt holding ``images`` [N, C, H, W] in
[0, 1], optionally ``labels``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clamp_export.data.fashion_mnist import load_fashion_mnist
from clamp_export.data.folder import load_image_folder
from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess

FMNIST_NAMES = {"fmnist": "test", "fmnist-test": "test", "fmnist-train": "train"}


def _fit(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Match channels and size to the model (grey→RGB by repetition, resize if needed)."""
    c, h, w = pre.input_size
    if images.shape[1] != c:
        if images.shape[1] == 1:
            images = images.expand(-1, c, -1, -1)
        elif c == 1:
            images = images.mean(1, keepdim=True)
        else:
            raise UserError(f"images have {images.shape[1]} channels but the model takes {c}")
    if images.shape[-2:] != (h, w):
        mode = "bilinear" if pre.interpolation == "bilinear" else "bicubic"
        images = F.interpolate(images, size=(h, w), mode=mode, align_corners=False).clamp(0, 1)
    return images


def _load_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
        else:
            d = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read tensor file {path}: {e}") from None
    if isinstance(d, torch.Tensor):
        return d.float(), None
    if not isinstance(d, dict) or "images" not in d:
        raise UserError(
            f"{path} must hold a tensor or a dict with 'images' (and optional 'labels')"
        )
    return d["images"].float(), d.get("labels")


def load_images(
    source: str, pre: Preprocess, limit: int | None = None, seed: int = 0, shuffle: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalized images, labels or None). ``shuffle`` draws a seeded random subset of ``limit``."""
    if source in FMNIST_NAMES or (
        Path(source).is_dir() and any(Path(source).glob("*-idx3-ubyte*"))
    ):
        split = FMNIST_NAMES.get(source, "test")
        root = None if source in FMNIST_NAMES else source
        imgs, labels = load_fashion_mnist(split, root)
        images = torch.from_numpy(imgs.copy()).float().div(255).unsqueeze(1)
        labels_t: torch.Tensor | None = torch.from_numpy(labels)
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(
                f"data {source!r} not found: give fmnist, fmnist-train, an IDX folder, an image "
                "class-folder or a tensor file"
            )
        if path.is_dir():
            images, labels_t = load_image_folder(path, pre.input_size, pre.interpolation)
        else:
            images, labels_t = _load_tensor_file(path)
    if images.dim() != 4:
        raise UserError(
            f"images from {source} have shape {tuple(images.shape)}; expected [N, C, H, W]"
        )
    if limit is not None and limit < len(images):
        idx = (
            torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
            if shuffle
            else torch.arange(limit)
        )
        images = images[idx]
        labels_t = labels_t[idx] if labels_t is not None else None
    return pre.normalize(_fit(images, pre)), labels_t


def noise_images(n: int, pre: Preprocess, seed: int = 0) -> torch.Tensor:
    """Gaussian images in normalized space (the data-free baseline)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *pre.input_size, generator=g)
