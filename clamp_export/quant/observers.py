"""Range observers for baseline calibration: min-max and percentile."""

from __future__ import annotations

import torch

_MAX_SAMPLES = 1 << 20  # percentile on a subsample keeps memory flat on large models


class MinMaxObserver:
    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        return self.lo, self.hi


class PercentileObserver:
    """Clips the tails: symmetric ranges take the p-th percentile of |x|, asymmetric both tails."""

    def __init__(self, percentile: float = 99.99, seed: int = 0) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        self.p = percentile / 100.0
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten().cpu()
        if flat.numel() > _MAX_SAMPLES:
            flat = flat[torch.randint(0, flat.numel(), (_MAX_SAMPLES,), generator=self.gen)]
        self.samples.append(flat)

    def range(self, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.samples:
            raise RuntimeError("observer saw no data")
        x = torch.cat(self.samples)
        if x.numel() > _MAX_SAMPLES:
            x = x[torch.randint(0, x.numel(), (_MAX_SAMPLES,), generator=self.gen)]
        if symmetric:
            amax = torch.quantile(x.abs(), self.p)
            return -amax, amax
        return torch.quantile(x, 1 - self.p), torch.quantile(x, self.p)


def make_observer(method: str, percentile: float = 99.99):
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(f"unknown range method {method!r}")
