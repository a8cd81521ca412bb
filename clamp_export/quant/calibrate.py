"""Baseline calibration: weights by per-channel min-max, activations by min-max or percentile.

Activation ranges are observed on the float model (all quantizers pass-through) over the given
calibration batch; fixed-range points (the softmax output) need no data.
"""

from __future__ import annotations

import torch
from torch import nn

from clamp_export.quant.fakequant import _QuantWeighted, quantizers, set_mode
from clamp_export.quant.observers import make_observer

RANGE_METHODS = ("minmax", "percentile")


def calibrate_weights(qmodel: nn.Module) -> None:
    for mod in qmodel.modules():
        if isinstance(mod, _QuantWeighted):
            q = mod.weight_q
            if q.is_float:
                continue
            w = q.rows(mod.weight.detach().float()).flatten(1)  # a range per channel or block
            q.calib_range = (w.min(1).values, w.max(1).values)  # set_bits re-derives from it
            q.set_params(*q.range_params(*q.calib_range))


@torch.no_grad()
def calibrate_activations(
    qmodel: nn.Module,
    images: torch.Tensor,
    method: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 32,
) -> None:
    acts = [q for _, _, q in quantizers(qmodel) if not q.is_weight]
    set_mode(qmodel, "off")
    for q in acts:
        if q.fixed_range is None:
            q.observer = make_observer(method, percentile)
            q.mode = "observe"
    for i in range(0, len(images), batch_size):
        qmodel(images[i : i + batch_size])
    for q in acts:
        if q.fixed_range is not None:
            lo, hi = torch.tensor(q.fixed_range[0]), torch.tensor(q.fixed_range[1])
        else:
            lo, hi = q.observer.range(q.symmetric)
            q.observer = None
        q.calib_range = (lo.reshape(1), hi.reshape(1))
        q.set_params(*q.range_params(*q.calib_range))
    set_mode(qmodel, "quant")


def calibrate(
    qmodel: nn.Module, images: torch.Tensor, method: str = "minmax", percentile: float = 99.99
) -> nn.Module:
    """Set every quant point's parameters and switch the model to fake-quant."""
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}")
    calibrate_weights(qmodel)
    calibrate_activations(qmodel, images, method, percentile)
    return qmodel
