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
from clamp_export.tensorfile import read_tensor_file

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
    d = read_tensor_file(path, "tensor file")
    if isinstance(d, torch.Tensor):
        return d, None
    if not isinstance(d, dict) or not isinstance(d.get("images"), torch.Tensor):
        raise UserError(
            f"{path} must hold a tensor or a dict with 'images' (and optional 'labels')"
        )
    labels = d.get("labels")
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise UserError(f"{path}: 'labels' must be a tensor of class indices")
    return d["images"], labels


def _check_set(source: str, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Everything a set can get wrong, said where it enters rather than after export."""
    if images.dim() != 4:
        raise UserError(
            f"images from {source} have shape {tuple(images.shape)}; expected [N, C, H, W]"
        )
    if len(images) == 0:
        raise UserError(f"{source} holds no images")
    if (
        not images.is_floating_point()
        or not torch.isfinite(images).all()
        or images.min() < 0
        or images.max() > 1
    ):
        raise UserError(
            f"images from {source} must be finite floats in [0, 1] (found "
            f"{str(images.dtype).removeprefix('torch.')}; uint8 pixels need dividing by 255)"
        )
    if labels is None:
        return
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise UserError(
            f"labels from {source} must be a 1-D tensor of class indices, got "
            f"{str(labels.dtype).removeprefix('torch.')} {tuple(labels.shape)}"
        )
    if len(labels) != len(images):
        raise UserError(f"{source} holds {len(images)} images but {len(labels)} labels")
    if labels.min() < 0:
        raise UserError(
            f"labels from {source} must be class indices >= 0, found {int(labels.min())}"
        )


def load_images(
    source: str,
    pre: Preprocess,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    resize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalized images, labels or None). ``shuffle`` draws a seeded random subset of ``limit``.

    ``resize=False`` (evaluation) refuses IDX and tensor data of another size or channel count
    than the model takes: accuracy on silently resampled images would not be the model's.
    Image folders are always resized on load, as timm's preprocessing does.
    """
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
    _check_set(source, images, labels_t)
    if not resize and tuple(images.shape[1:]) != tuple(pre.input_size):
        have, want = "x".join(map(str, images.shape[1:])), "x".join(map(str, pre.input_size))
        raise UserError(
            f"images from {source} are {have} (CxHxW) but the model takes {want}; resize them, "
            "or pass an image class-folder (resized on load)"
        )
    if limit is not None and limit < len(images):
        idx = (
            torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
            if shuffle
            else torch.arange(limit)
        )
        images = images[idx]
        labels_t = labels_t[idx] if labels_t is not None else None
    return pre.normalize(_fit(images.float(), pre)), labels_t


def noise_images(n: int, pre: Preprocess, seed: int = 0) -> torch.Tensor:
    """Gaussian images in normalized space (the data-free baseline)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *pre.input_size, generator=g)
