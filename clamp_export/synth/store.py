"""Synthetic sets on disk: images (safetensors), a PNG grid to look at, and ``synth.json``.

Sets live in the calibration store (``clamp_export.store``) under ``calib/synth/``, keyed by
(model weights hash, architecture, preprocessing, generator config).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clamp_export import atomic
from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess
from clamp_export.synth.config import SynthConfig
from clamp_export.synth.generator import SynthResult

DEFAULT_CACHE = Path(os.environ.get("CLAMP_EXPORT_CACHE", "calib"))
FILES = ("images.safetensors", "grid.png", "synth.json")


def grid_png(images: torch.Tensor, pre: Preprocess, path: Path, scale: int | None = None) -> None:
    """Un-normalized images tiled in a near-square grid, upscaled so small ones are visible."""
    from PIL import Image

    x = pre.denormalize(images.detach().float()).clamp(0, 1)
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = scale or max(1, 112 // max(h, w))
    pad = 2
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = x[i].permute(1, 2, 0).numpy()
    img = (canvas * 255).round().astype(np.uint8)
    img = img[..., 0] if c == 1 else img
    pil = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    with atomic.atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def record_of(result: SynthResult, meta: dict) -> dict:
    return {
        **meta,
        "config": result.config.to_dict(),
        "misprediction_rate": result.misprediction_rate,
        "seconds": round(result.seconds, 2),
        "n": int(result.images.shape[0]),
        "loss_curve": result.loss_curve,
    }


def write_files(result: SynthResult, pre: Preprocess, folder: Path, meta: dict) -> None:
    """The three files into ``folder``, each written atomically; other files are left alone."""
    with atomic.atomic_path(folder / FILES[0]) as tmp:
        save_file({"images": result.images.contiguous(), "targets": result.targets}, str(tmp))
    grid_png(result.images, pre, folder / FILES[1])
    with atomic.atomic_path(folder / FILES[2]) as tmp:
        tmp.write_text(json.dumps(record_of(result, meta), indent=1) + "\n")


def read_set(folder: Path) -> tuple[SynthResult, dict]:
    try:
        tensors = load_file(str(folder / FILES[0]))
        record = json.loads((folder / FILES[2]).read_text())
        result = SynthResult(
            images=tensors["images"],
            targets=tensors["targets"],
            config=SynthConfig.from_dict(record["config"]),
            loss_curve=record["loss_curve"],
            misprediction_rate=record["misprediction_rate"],
            seconds=record["seconds"],
        )
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"synthetic set in {folder} is unreadable ({e}); delete the folder to regenerate"
        ) from None
    return result, record


def copy_set(src: Path, dst: Path) -> None:
    atomic.ensure_writable_dir(dst)
    for name in FILES:
        with atomic.atomic_path(dst / name) as tmp:
            shutil.copyfile(src / name, tmp)
