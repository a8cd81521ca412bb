"""Uniform affine quantization, exactly as ONNX QuantizeLinear / DequantizeLinear compute it.

QuantizeLinear: q = saturate(round_half_to_even(x / scale) + zero_point). The division (not a
multiply by 1/scale) and the half-to-even rounding both matter for bit-exact parity with the
exported graph. Everything here is plain tensor math: no modules, no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def level_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer levels for ``bits`` bits: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or p.numel() == 1:
        return p.reshape(()) if p.numel() == 1 else p
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return p.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer levels (as a float tensor) of ``x``; ``torch.round`` is half-to-even."""
    s = _broadcast(scale.to(x.dtype), x, axis)
    z = _broadcast(zero_point.to(x.dtype), x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    s = _broadcast(scale.to(q.dtype), q, axis)
    z = _broadcast(zero_point.to(q.dtype), q, axis)
    return (q - z) * s


class _RoundSTE(torch.autograd.Function):
    """Straight-through estimator, so fake-quant models stay differentiable for image refinement."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """dequantize(quantize(x)), with a straight-through gradient.

    ``zero_point=None`` means all zeros (symmetric quantizers), which spares two passes over ``x``.
    Without autograd the same arithmetic runs in place on one buffer: the search's many small
    tensors then fake-quantize 2-3x faster, with bit-identical results.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        zp = torch.zeros(scale.shape, dtype=torch.int32) if zero_point is None else zero_point
        return _RoundSTE.apply(x, scale, zp.to(scale.device), qmin, qmax, axis)
    s = _broadcast(scale.to(x.dtype), x, axis)
    q = torch.div(x, s).round_()
    if zero_point is None:
        return q.clamp_(qmin, qmax).mul_(s)
    z = _broadcast(zero_point.to(x.dtype), x, axis)
    return q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def fake_quantize_learned(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """``fake_quantize`` with a gradient for ``scale`` too (LSQ, Esser et al. 2020).

    Rounding passes gradients straight through and clamping does not, so a learned scale trades
    clipping error against rounding error. The values are ``fake_quantize``'s, bit for bit:
    ``v + (round(v) - v)`` is exact in floating point.
    """
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point.to(x.dtype), x, axis)
    v = x / s
    v = v + (torch.round(v) - v).detach()
    return (torch.clamp(v + z, qmin, qmax) - z) * s


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map [lo, hi] onto the levels.

    Symmetric (signed levels): scale = max|x| / qmax, zero-point 0, so +max is exactly
    representable and -max saturates one level early, as TensorRT does. Asymmetric: the range is
    widened to include 0 (so 0 is exact), scale = (hi - lo) / (qmax - qmin).
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / qmax, min=tiny)
        return scale.float(), torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=tiny)
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale.float(), zp


def twin_levels(bits: int) -> int:
    """Levels in each part of a ``bits``-bit twin-uniform quantizer: the top bit picks the part."""
    return 2 ** (bits - 1)


def twin_scale(hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Fine scale of a twin-uniform quantizer whose coarse part tops out at ``hi``.

    The coarse scale is ``twin_levels(bits)`` times the fine one, so the fine levels reach just
    below the first coarse level and the two parts together hold 2^b - 1 distinct values (0
    included) spaced like a two-step logarithm: at 4 bits, steps of 1/56 up to 7/56, then of 1/7.
    """
    n = twin_levels(bits)
    return hi / ((n - 1) * n)


def twin_split(
    x: torch.Tensor, threshold: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fine part, coarse part) of ``x``: every element goes to exactly one, the other holds 0.

    ``threshold`` is where rounding on the fine grid would leave its top level (top + 1/2).
    """
    fine = torch.where(x < threshold, x, 0.0)
    return fine, x - fine


_FP32_EXACT = 2**24  # every integer of smaller magnitude is an FP32 value


def integer_product(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    levels_a: torch.Tensor,
    levels_b: torch.Tensor,
    scale: torch.Tensor,
    bound: int,
) -> torch.Tensor:
    """A matmul or conv of two quantized operands as an INT8 kernel computes it.

    The levels' products are summed exactly (an int32 accumulator), converted to float once and
    scaled once by ``scale`` (the two operands' scales multiplied: exact for FP16 scales). A float
    kernel on the dequantized values rounds every partial sum instead, in an order that differs
    between torch and each runtime; in an FP16 graph that one-ulp difference moves 4-bit levels
    downstream. ``bound`` (|level a| * |level b| * summed terms, at most) picks an FP64 sum where
    FP32 could not hold every partial sum exactly; it is then converted as int32 → float is.
    """
    if bound < _FP32_EXACT:
        return product(levels_a, levels_b) * scale
    return product(levels_a.double(), levels_b.double()).float() * scale
