"""Preprocessing constants, one dataclass per model (timm's pretrained-cfg fields, flattened)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # (C, H, W)
    interpolation: str = "bicubic"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the model's normalized space."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return x * std + mean

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel bounds of valid pixels [0, 1] in normalized space, shaped [1, C, 1, 1]."""
        lo = self.normalize(torch.zeros(1, self.input_size[0], 1, 1))
        hi = self.normalize(torch.ones(1, self.input_size[0], 1, 1))
        return lo, hi

    def to_dict(self) -> dict:
        return asdict(self)
