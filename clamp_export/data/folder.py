"""An ImageNet-style class-folder dataset (root/CLASS/image.ext), resized to the model's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clamp_export.errors import UserError

_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def load_image_folder(
    root: Path | str,
    input_size: tuple[int, int, int],
    interpolation: str = "bicubic",
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images in [0, 1] [N, C, H, W], labels [N]); classes are the sorted subfolder names."""
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root} has no class subfolders (expected ROOT/CLASS/IMAGE)")
    files = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in _EXTS
    ]
    if not files:
        raise UserError(f"no images ({', '.join(sorted(_EXTS))}) under {root}")
    if limit is not None:
        files = files[:limit]
    c, h, w = input_size
    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(
        interpolation, Image.BICUBIC
    )
    mode = "L" if c == 1 else "RGB"
    images = np.empty((len(files), h, w, c), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            img = Image.open(f).convert(mode).resize((w, h), resample)
        except OSError as e:
            raise UserError(f"cannot read image {f}: {e}") from None
        images[i] = np.asarray(img).reshape(h, w, c)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return x, torch.tensor([label for _, label in files])
