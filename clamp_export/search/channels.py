"""Per-output-channel weight-scale scan: a proposal the layer search accepts only if F falls.

*(ours)* The evolution mutates all of a layer's channel scales at once (128-1536 numbers per
candidate), so selection sees only their sum and each channel stays near min-max. But output
channel c of a linear or conv depends on weight row c alone, so the best multiplier of each
channel's scale can be found independently: one matmul per multiplier scores every channel
together. The score is the channel's output error on the layer's own (quantized) input, with the
float weights as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clamp_export.quant.fakequant import QuantConv2d, _QuantWeighted


def _channel_outputs(layer: _QuantWeighted, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[out channels, positions] outputs of ``layer`` with weight ``w`` (no bias)."""
    if isinstance(layer, QuantConv2d):
        y = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return y.transpose(0, 1).flatten(1)
    return F.linear(x, w).flatten(0, -2).t()


@torch.no_grad()  # not inference mode: the scales it sets must stay usable under autograd
def scan_weight_channels(
    layer: _QuantWeighted, x: torch.Tensor, multipliers: tuple[float, ...]
) -> None:
    """Set each output channel's weight scale to the min-error multiple of its current one.

    ``x`` is the layer's input (before its input quantizer). The current scale is always a
    candidate, so no channel's error rises.
    """
    xq = layer.input_q(x)
    wq = layer.weight_q
    ref = _channel_outputs(layer, xq, layer.weight)
    base, zp = wq.scale.clone(), wq.zero_point
    per_channel = len(base) // layer.weight.shape[0]  # blocks per channel (w4a16), else 1
    best_scale, best_err = base.clone(), torch.full_like(base, float("inf"))
    for m in (1.0, *multipliers):  # the current scale first: it wins every tie
        wq.set_params(base * m, zp)  # applies the target's storage rounding
        err = ((_channel_outputs(layer, xq, wq(layer.weight)) - ref) ** 2).mean(1)
        err = err.repeat_interleave(per_channel)  # a channel's blocks move together
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, wq.scale, best_scale)
    wq.set_params(best_scale, zp)
