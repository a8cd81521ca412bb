"""Fake-quant wrapping of a timm ViT at the quant points of DESIGN §2.

Quantizers sit on the inputs and weights of matrix products only: qkv/proj/fc1/fc2, the two
attention matmuls (q, kᵀ, softmax output, v), the patch-embedding conv and the head(s). Each
``Quantizer`` has three modes: ``off`` (float), ``observe`` (float, feeding a range observer) and
``quant`` (fake-quant). Under ``exporting(model)`` the same modules trace to exact
QuantizeLinear/DequantizeLinear nodes, so the ONNX graph computes what this model computes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clamp_export.errors import UserError
from clamp_export.quant.bits import BLOCK_SIZES, FLOAT_BITS, SOFTMAX_LEVELS, BitsSpec
from clamp_export.quant.equalize import applied_equalization, apply_equalization
from clamp_export.quant.fp16 import emulate_fp16_graph, to_fp16_grid, to_fp16_grid_
from clamp_export.quant.math import (
    fake_quantize,
    fake_quantize_learned,
    integer_product,
    level_range,
    params_from_range,
    quantize,
    twin_levels,
    twin_scale,
    twin_split,
)
from clamp_export.quant.qparams import WEIGHT_ROLE, QParams, QuantPoint
from clamp_export.quant.targets import TargetProfile


class _QDQ(torch.autograd.Function):
    """Activation fake-quant that exports as [Clip →] QuantizeLinear → DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale: float, zp: int, qmin: int, qmax: int, signed: bool):  # type: ignore[override]
        s = torch.tensor(scale, dtype=x.dtype)
        z = torch.tensor(zp, dtype=x.dtype)
        return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, signed):
        ftype = _export_float_dtype()
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=ftype))
        z = g.op("Constant", value_t=torch.tensor(zp, dtype=torch.int8 if signed else torch.uint8))
        container = (-128, 127) if signed else (0, 255)
        if (qmin, qmax) != container:  # Q saturates at the container bounds: enforce the levels
            lo = g.op("Constant", value_t=torch.tensor((qmin - zp) * scale, dtype=ftype))
            hi = g.op("Constant", value_t=torch.tensor((qmax - zp) * scale, dtype=ftype))
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _DQWeight(torch.autograd.Function):
    """Pre-quantized int8 weight (an initializer) → per-channel DequantizeLinear."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, scale: torch.Tensor, axis: int):  # type: ignore[override]
        shape = [1] * q.dim()
        shape[axis] = -1
        return q.to(scale.dtype) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, axis):
        channels = scale.type().sizes()[0]
        z = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", q, scale, z, axis_i=axis)


class _DQBlockedWeight(torch.autograd.Function):
    """INT4 weight [K, N] in blocks of ``block`` rows (input channels), one scale per block and
    output channel → opset-21 blocked DequantizeLinear (int4 is packed after tracing:
    ``export.qdq``). Zero-point 0, as TensorRT's weight-only format has it."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, scale: torch.Tensor, block: int):  # type: ignore[override]
        return q.to(scale.dtype) * scale.repeat_interleave(block, dim=0)

    @staticmethod
    def symbolic(g, q, scale, block):
        return g.op("DequantizeLinear", q, scale, axis_i=0, block_size_i=block)


_EXPORT_DTYPE = [torch.float32]
_FP16_MIN_NORMAL = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _export_float_dtype() -> torch.dtype:
    return _EXPORT_DTYPE[0]


class Quantizer(nn.Module):
    """One quant point: its levels, its parameters, and its mode."""

    def __init__(
        self,
        bits: int,
        signed: bool,
        symmetric: bool,
        axis: int | None = None,
        store_dtype: torch.dtype = torch.float32,
        window: bool = False,
        block: int | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.signed, self.axis = bits, signed, axis
        # a weight's scales per block of ``block`` input channels (INT4 weight-only), row-major:
        # the per-row quantizer of the weight viewed as [out * in / block, block]
        self.block = block
        self._symmetric = symmetric
        self.window = window  # may slide its levels along the int8 grid (TargetProfile.act_window)
        self.store_dtype = store_dtype  # the float type the deployed graph stores scales in
        # a float point (16 bits) has no levels; it passes its input through
        self.qmin, self.qmax = level_range(bits, signed) if bits < FLOAT_BITS else (0, 0)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.mode = "off"
        self.observer = None
        self.exporting = False
        self.calib_range: tuple[torch.Tensor, torch.Tensor] | None = None  # set by calibration
        self._cached_weight: tuple[torch.Tensor, tuple[int, int], torch.Tensor] | None = None
        self._zp_is_zero = True  # set_params keeps it current; fake_quantize then skips the zp
        # twin-uniform levels (the softmax output, ``wrap_model(softmax="twin")``): fine and coarse
        # parts, each its own Q/DQ into its own matmul; see ``parts``
        self.twin = False
        self._twin_threshold = 0.0
        self.log_scale: torch.Tensor | None = None  # a trainable log(scale), under learnable_scales

    def set_bits(self, bits: int) -> None:
        """Change the level count; parameters follow from the calibration range (mixed precision)."""
        if self.calib_range is None:
            raise RuntimeError("set_bits needs a calibrated quantizer (no calibration range)")
        self.bits = bits
        self.qmin, self.qmax = level_range(bits, self.signed)
        self.set_params(*self.range_params(*self.calib_range))

    def range_params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point that cover [lo, hi] with this quantizer's levels."""
        if self.twin:
            return twin_scale(hi.float(), self.bits), torch.zeros_like(hi, dtype=torch.int32)
        return params_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)

    @property
    def is_weight(self) -> bool:
        return self.axis is not None

    @property
    def is_float(self) -> bool:
        """Not a quant point: a 16-bit point stays in the graph's float type (w4a16)."""
        return self.bits >= FLOAT_BITS

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """The view whose rows the scales apply to: output channels, or blocks of them."""
        if self.block is None:
            return w
        if w.shape[-1] % self.block:
            raise UserError(
                f"a weight of {w.shape[-1]} input channels does not split into blocks of "
                f"{self.block}; choose another --block-size"
            )
        return w.reshape(-1, self.block)

    @property
    def slides(self) -> bool:
        """Below 8 bits a window quantizer's levels are a Clip on the int8 grid, free to move."""
        return self.window and self.bits < 8 and not self.twin

    @property
    def symmetric(self) -> bool:
        """Whether calibration and search pin the zero-point at 0.

        A sliding window is searched as an asymmetric quantizer: clamp(round(x/s) + z, qmin, qmax)
        - z equals clamp(round(x/s), qmin - z, qmax - z), so its zero-point z is the window's
        offset, and the graph writes that window as Clip bounds with zero-point 0.
        """
        return self.twin or (self._symmetric and not self.slides)

    def graph_levels(self) -> tuple[int, int, int]:
        """(zero-point, lowest level, highest level) of an activation, as the graph writes them."""
        z = int(self.zero_point)
        if self.twin:  # each part: zero-point 0, levels 0 .. n-1
            return 0, 0, twin_levels(self.bits) - 1
        if self.slides:
            return 0, self.qmin - z, self.qmax - z
        return z, self.qmin, self.qmax

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        # normal tensors even when called under inference_mode (mixed-precision allocation): the
        # export traces through them with autograd on, which refuses inference tensors
        with torch.inference_mode(False):
            scale = scale.detach().float()
            if self.store_dtype == torch.float16:  # an FP16 graph holds FP16 scales: use those
                scale = scale.clamp(min=_FP16_MIN_NORMAL, max=_FP16_MAX).half().float()
            self.scale = scale.clone().to(self.scale.device)
            self.zero_point = zero_point.detach().to(torch.int32).clone().to(self.scale.device)
        self._zp_is_zero = not bool(self.zero_point.any())
        self._cached_weight = None
        if self.twin:  # the split point, as the graph stores it
            t = (twin_levels(self.bits) - 0.5) * float(self.scale)
            self._twin_threshold = float(torch.tensor(t).to(self.store_dtype))

    def max_level(self) -> int:
        """The largest |level| the graph writes at this point: the integer GEMM's range."""
        if self.is_weight:  # weights are symmetric: zero-point 0 (``_DQWeight``)
            return max(-self.qmin, self.qmax)
        z, lo, hi = self.graph_levels()
        return max(abs(lo - z), abs(hi - z))

    def part_scales(self) -> tuple[torch.Tensor, ...]:
        """The scale of each of ``parts``' terms: a twin quantizer's coarse grid is n fine steps."""
        if not (self.twin and self.mode == "quant"):
            return (self.scale,)
        return self.scale, self.scale * twin_levels(self.bits)

    def point(self) -> QuantPoint:
        if self.slides:
            _, lo, hi = self.graph_levels()
            zeros = torch.zeros_like(self.zero_point)
            return QuantPoint.from_tensors(
                self.bits, self.signed, self.scale, zeros, self.axis, window=(lo, hi)
            )
        return QuantPoint.from_tensors(
            self.bits,
            self.signed,
            self.scale,
            self.zero_point,
            self.axis,
            twin=self.twin,
            block=self.block,
        )

    def load_point(self, p: QuantPoint, where: str) -> None:
        """Bits come from the contract (mixed precision); signedness and axis must match."""
        if p.signed != self.signed or p.axis != self.axis:
            raise UserError(
                f"qparams entry {where} is {'int' if p.signed else 'uint'}{p.bits} axis={p.axis}, "
                f"but the model was built for {'int' if self.signed else 'uint'} axis={self.axis}; "
                "re-run calibration with the same --target"
            )
        self.bits, self.twin, self.block = p.bits, p.twin, p.block
        self.qmin, self.qmax = level_range(p.bits, p.signed)
        scale, zp = p.tensors()
        if p.window is not None:
            if not self.slides:
                raise UserError(
                    f"qparams entry {where} clips to the level window {p.window}, which this "
                    "target or bit-width cannot run; re-run calibration with the same --target"
                )
            zp = torch.full_like(zp, self.qmin - p.window[0])
        self.set_params(scale, zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off" or self.is_float:
            return x
        if self.block is not None and self.mode == "quant":
            return self._fake_quantize(self.rows(x)).reshape(x.shape)
        if self.mode == "observe":
            self.observer.update(x)
            return x
        if self.twin:
            raise RuntimeError("a twin-uniform quantizer feeds two matmuls: call parts(x)")
        if self.exporting and not self.is_weight:
            return _QDQ.apply(x, float(self.scale), *self.graph_levels(), self.signed)
        if not self.is_weight:
            x = self.as_stored(x)
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_scale is not None:
            scale = self.log_scale.exp()
            return fake_quantize_learned(x, scale, self.zero_point, self.qmin, self.qmax, self.axis)
        zp = None if self._zp_is_zero else self.zero_point
        return fake_quantize(x, self.scale, zp, self.qmin, self.qmax, self.axis)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """An activation as the graph holds it: in an FP16 graph, Q sees FP16 values."""
        return to_fp16_grid(x) if self.store_dtype == torch.float16 else x

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fake-quantized terms whose products with the next operand sum to its product.

        One term, except for a twin-uniform quantizer in ``quant`` mode: its fine and coarse
        parts, each on a uniform grid of its own, so each product is an ordinary INT8 matmul.
        """
        if not (self.twin and self.mode == "quant"):
            return (self(x),)
        n = twin_levels(self.bits)

        def grid(part: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # levels 0 .. n-1
            if self.exporting:
                return _QDQ.apply(part, float(scale), 0, 0, n - 1, self.signed)
            return fake_quantize(part, scale, None, 0, n - 1)

        fine, coarse = twin_split(x if self.exporting else self.as_stored(x), self._twin_threshold)
        return grid(fine, self.scale), grid(coarse, self.scale * n)

    def quantized_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, reused until the parameters or the weight change.

        The search re-runs every downstream layer for each candidate; only the searched layer's
        weights change, so the others come from this cache.
        """
        learning = self.log_scale is not None or (w.requires_grad and torch.is_grad_enabled())
        if self.mode != "quant" or learning:
            return self(w)
        c = self._cached_weight
        # the storage pointer changes when .to() / .cuda() swaps a parameter's data in place
        stamp = (w._version, w.data_ptr())
        if c is None or c[0] is not w or c[1] != stamp:
            # a normal tensor (not an inference tensor), so autograd may read it later
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = (w, stamp, self(w))
        return self._cached_weight[2]

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer levels of ``w`` as int8 (the deployed initializer)."""
        rows = self.rows(w.float())
        q = quantize(rows, self.scale, self.zero_point, self.qmin, self.qmax, 0)
        return q.reshape(w.shape).to(torch.int8)

    def extra_repr(self) -> str:
        if self.is_float:
            return "float"
        kind = "twin " if self.twin else ("int" if self.signed else "uint")
        block = f", block={self.block}" if self.block else ""
        return f"{kind}{self.bits}, axis={self.axis}{block}, mode={self.mode}"


def _integer_gemm(*points: Quantizer) -> bool:
    """Whether a product of operands fake-quantized by ``points`` runs as the FP16 graph's INT8
    GEMM does (``quant.math.integer_product``): in an FP16 graph, between integer points, outside
    autograd. The scale refinement's gradients take the float product, which differs from it in
    summation order only."""
    return not torch.is_grad_enabled() and all(
        q.mode == "quant"
        and not q.exporting  # the graph writes a MatMul of DequantizeLinear outputs
        and q.store_dtype == torch.float16
        and not q.is_float
        and q.block is None
        and q.log_scale is None
        for q in points
    )


def _matmul(
    a: torch.Tensor,
    qa: Quantizer,
    b: torch.Tensor,
    qb: Quantizer,
    scale_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b`` of operands fake-quantized by ``qa`` and ``qb`` (``scale_a``: one of a twin
    quantizer's part scales), in the deployed graph's arithmetic."""
    if not _integer_gemm(qa, qb):
        return a @ b
    sa = qa.scale if scale_a is None else scale_a  # a dequantized value is level x FP16 scale,
    bound = qa.max_level() * qb.max_level() * a.shape[-1]  # so the division is exact
    return integer_product(torch.matmul, a / sa, b / qb.scale, sa * qb.scale, bound)


class _QuantWeighted(nn.Module):
    """Shared plumbing of QuantLinear / QuantConv2d: input and weight quantizers, export weights."""

    def __init__(self, layer: nn.Module, input_q: Quantizer, weight_q: Quantizer) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.input_q = input_q
        self.weight_q = weight_q
        self.exporting = False
        # the graph's float type: an FP16 graph stores each product and each bias add in FP16.
        # Applied to results the module has just computed only, so in place (``to_fp16_grid_``)
        self.round = to_fp16_grid_ if input_q.store_dtype == torch.float16 else _unchanged

    def prepare_export(self, dtype: torch.dtype) -> None:
        """Freeze the integer weights as buffers, so they trace to int8 initializers (a float
        weight stays a float initializer, in the graph's float type)."""
        wq = self.weight_q
        linear = isinstance(self, QuantLinear)  # Linear [N, K] -> MatMul [K, N]: channels on 1
        if wq.is_float:
            w = self.weight.detach().to(dtype)
            self.register_buffer("weight_float", w.t().contiguous() if linear else w)
            return
        q = wq.int_weight(self.weight)
        scale = wq.scale.to(dtype)
        if (
            wq.block is not None
        ):  # [N * K/B] scales -> [K/B, N], blocks along K of the [K, N] weight
            scale = scale.reshape(q.shape[0], -1).t().contiguous()
        if linear:
            q = q.t().contiguous()
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)

    def release_export(self) -> None:
        for name in ("weight_int8", "weight_scale", "weight_float"):
            if hasattr(self, name):
                delattr(self, name)

    def _export_weight(self) -> torch.Tensor:
        if self.weight_q.is_float:
            return self.weight_float
        if self.weight_q.block is not None:
            return _DQBlockedWeight.apply(self.weight_int8, self.weight_scale, self.weight_q.block)
        return _DQWeight.apply(
            self.weight_int8, self.weight_scale, 1 if isinstance(self, QuantLinear) else 0
        )


class QuantLinear(_QuantWeighted):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        if self.exporting:
            y = torch.matmul(x, self._export_weight())
            return y + self.bias if self.bias is not None else y
        w = self.weight_q.quantized_weight(self.weight)
        if self.round is _unchanged:
            return F.linear(x, w, self.bias)
        y = self.round(_matmul(x, self.input_q, w.t(), self.weight_q))  # MatMul, then Add
        return self.round(y + self.bias) if self.bias is not None else y


class QuantConv2d(_QuantWeighted):
    def __init__(self, conv: nn.Conv2d, input_q: Quantizer, weight_q: Quantizer) -> None:
        super().__init__(conv, input_q, weight_q)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise UserError(
                f"patch embedding with padding_mode={conv.padding_mode} is not supported"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(self.input_q.as_stored(x))  # an FP16 graph takes FP16 images
        w = self._export_weight() if self.exporting else self.weight_q.quantized_weight(self.weight)
        if _integer_gemm(self.input_q, self.weight_q):  # never while exporting
            return self.round(self._integer_conv(x, w))
        return self.round(F.conv2d(x, w, self.bias, *self._geometry()))  # one Conv node

    def _geometry(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups

    def _integer_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The INT8 conv (``_matmul``'s arithmetic), then its bias in the same FP32 epilogue."""
        qx, qw = self.input_q, self.weight_q
        sw = qw.scale.reshape(-1, 1, 1, 1)
        bound = qx.max_level() * qw.max_level() * w[0].numel()

        def conv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.conv2d(a, b, None, *self._geometry())

        y = integer_product(conv, x / qx.scale, w / sw, (qx.scale * sw).reshape(1, -1, 1, 1), bound)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


class QuantAttention(nn.Module):
    """timm Attention, unfused, with quantizers on both matmuls' inputs."""

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, make_act) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise UserError("gated attention is not supported")
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        if qkv.input_q.store_dtype == torch.float16:  # the FP16 graph's constant: 1/sqrt(32)
            self.scale = float(torch.tensor(attn.scale).half())  # is 0.17676, not 0.17678
        self.qkv, self.proj = qkv, proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.q, self.k, self.attn, self.v = make_act(), make_act(), make_act(fixed=True), make_act()
        self.round = qkv.round  # each product, the scaling and the softmax are graph tensors
        self.on_output = None  # Stage 1 reads the head-averaged attn @ v through this hook

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UserError("attention masks are not supported by the fake-quant model")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        r = self.round
        q = self.q(r(q * self.scale))
        kt = self.k(k.transpose(-2, -1))
        vq = self.v(v)
        parts = self.attn.parts(r(r(_matmul(q, self.q, kt, self.k)).softmax(dim=-1)))
        # twin-uniform softmax output: one matmul per part, on its own grid
        products = [
            r(_matmul(p, self.attn, vq, self.v, s))
            for p, s in zip(parts, self.attn.part_scales(), strict=True)
        ]
        x = products[0]
        for p in products[1:]:
            x = r(x + p)
        if self.on_output is not None:
            self.on_output(x)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(self.norm(x))


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def _round_floats(model: nn.Module, store: torch.dtype) -> None:
    """Round every float parameter and buffer to what the deployed graph stores."""
    if store == torch.float16:
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())


def wrap_model(
    model: nn.Module, bits: BitsSpec, profile: TargetProfile, softmax: str = "uniform"
) -> nn.Module:
    """A fake-quant copy of a timm VisionTransformer; the original is left untouched.

    The patch embedding and the head(s) keep ``bits.edge`` bits on input and weight (DESIGN §2).
    ``softmax="twin"`` gives the softmax output twin-uniform levels (fine below 1/8 of its range,
    coarse above: ``quant.math.twin_scale``) at the same bit count, fixed to cover [0, 1] and
    deployed as two Q/DQ'd parts, each in its own ``attn @ v`` matmul.
    Under an FP16 profile every float parameter and scale is rounded to FP16, as the deployed
    graph stores them, and every tensor the graph stores is rounded where it stores it
    (``quant.fp16``), so the fake-quant model computes what the engine computes.
    """
    from timm.models.vision_transformer import Attention

    if softmax not in SOFTMAX_LEVELS:
        raise UserError(
            f"unknown softmax levels {softmax!r}; choose one of: {', '.join(SOFTMAX_LEVELS)}"
        )
    qmodel = copy.deepcopy(model).eval()
    store = torch.float16 if profile.float_dtype == "float16" else torch.float32
    _round_floats(qmodel, store)

    def act(fixed: bool = False, nbits: int = bits.act) -> Quantizer:
        q = Quantizer(
            nbits,
            profile.act_signed,
            profile.act_symmetric,
            store_dtype=store,
            window=profile.act_window,
        )
        q.fixed_range = (0.0, 1.0) if fixed else None
        q.twin = fixed and softmax == "twin"
        return q

    def weight(nbits: int, block: int | None = None) -> Quantizer:
        q = Quantizer(
            nbits,
            profile.weight_signed,
            profile.weight_symmetric,
            axis=0,
            store_dtype=store,
            block=block,
        )
        q.fixed_range = None
        return q

    def linear(
        layer: nn.Linear, nbits: int, in_bits: int = bits.act, block: int | None = None
    ) -> QuantLinear:
        if block and layer.in_features % block:
            raise UserError(
                f"a linear layer of {layer.in_features} input channels does not split into INT4 "
                f"blocks of {block}; choose --block-size {' or '.join(map(str, BLOCK_SIZES))}"
                " that divides it"
            )
        return QuantLinear(layer, act(nbits=in_bits), weight(nbits, block))

    block = bits.block if bits.weight_only else None  # INT4 weight-only: blocks along K

    pe = qmodel.patch_embed.proj
    if not isinstance(pe, nn.Conv2d):
        raise UserError(f"patch embedding {type(pe).__name__} is not a Conv2d")
    qmodel.patch_embed.proj = QuantConv2d(pe, act(nbits=bits.edge), weight(bits.edge))
    for i, blk in enumerate(qmodel.blocks):
        if not isinstance(blk.attn, Attention):
            raise UserError(
                f"blocks.{i}.attn is a {type(blk.attn).__name__}; only timm's standard Attention "
                "is supported"
            )
        a = blk.attn
        qkv, proj = (
            linear(a.qkv, bits.weight, block=block),
            linear(a.proj, bits.weight, block=block),
        )
        blk.attn = QuantAttention(a, qkv, proj, act)
        blk.mlp.fc1 = linear(blk.mlp.fc1, bits.weight, block=block)
        blk.mlp.fc2 = linear(blk.mlp.fc2, bits.weight, block=block)
    for head in ("head", "head_dist"):
        layer = getattr(qmodel, head, None)
        if isinstance(layer, nn.Linear):
            setattr(qmodel, head, linear(layer, bits.edge, in_bits=bits.edge))
    if store == torch.float16:
        emulate_fp16_graph(qmodel)
    return qmodel.to(next(model.parameters()).device)  # the new quantizers join the model's device


def quantizers(model: nn.Module) -> Iterator[tuple[str, str, Quantizer]]:
    """(module name, role, quantizer) for every quant point, in forward order; points that
    stay float (16 bits, w4a16's activations) are none."""
    for name, mod in model.named_modules():
        for role, q in layer_points(mod):
            yield name, role, q


def layer_points(module: nn.Module) -> list[tuple[str, Quantizer]]:
    """(role, quantizer) of one layer's quant points; empty for a layer with none."""
    if isinstance(module, _QuantWeighted):
        pairs = [("input", module.input_q), (WEIGHT_ROLE, module.weight_q)]
    elif isinstance(module, QuantAttention):
        pairs = [(role, getattr(module, role)) for role in ("q", "k", "attn", "v")]
    else:
        return []
    return [(role, q) for role, q in pairs if not q.is_float]


def set_mode(model: nn.Module, mode: str) -> None:
    for _, _, q in quantizers(model):
        q.mode = mode


@contextlib.contextmanager
def learnable_scales(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every fake-quantizing scale of ``model`` as a trainable log-scale, for the scale refinement.

    Zero-points and level windows stay as searched: they are integers. On exit the learned scales
    are installed as the graph stores them. Twin-uniform scales stay fixed to [0, 1] by design.
    """
    qs = [q for _, _, q in quantizers(model) if q.mode == "quant" and not q.twin]
    for q in qs:
        q.log_scale = q.scale.log().clone().requires_grad_(True)
    try:
        yield [q.log_scale for q in qs]
    finally:
        for q in qs:
            scale, q.log_scale = q.log_scale.detach().exp(), None
            q.set_params(scale, q.zero_point)


def equalize_wrapped(qmodel: nn.Module, factors: dict) -> nn.Module:
    """Equalize a fake-quant model in place, rounding the rewritten floats as its graph stores them.

    Searched and reloaded models both come this way (wrap, then equalize), so they match bit for bit.
    """
    apply_equalization(qmodel, factors)
    _round_floats(qmodel, next(q.store_dtype for _, _, q in quantizers(qmodel)))
    return qmodel


def load_qparams(model: nn.Module, qp: QParams) -> nn.Module:
    """Install every entry of ``qp`` and switch the model to fake-quant."""
    expected = {(m, r) for m, r, _ in quantizers(model)}
    present = {(m, r) for m, r, _ in qp.points()}
    if expected != present:
        missing = sorted(f"{m}:{r}" for m, r in expected - present)[:3]
        extra = sorted(f"{m}:{r}" for m, r in present - expected)[:3]
        raise UserError(
            f"qparams.json does not match this model (missing {missing}, unexpected {extra}); "
            "it was made for another model"
        )
    modules = dict(model.named_modules())
    for name, role, _ in quantizers(model):  # every check before the model is touched
        p, n = qp.get(name, role), 1
        if role == WEIGHT_ROLE:
            w = modules[name].weight
            n = w.shape[0] if p.block is None else w.numel() // p.block
            if p.block is not None and w.shape[-1] % p.block:
                raise UserError(
                    f"qparams entry {name}:{role} has blocks of {p.block}, which do not divide "
                    f"the layer's {w.shape[-1]} input channels; it was made for another model"
                )
        if len(p.scale) != n or len(p.zero_point) != n:
            raise UserError(
                f"qparams entry {name}:{role} has {len(p.scale)} scales and {len(p.zero_point)} "
                f"zero-points, but the layer needs {n}; it was made for another model"
            )
    if qp.equalization != applied_equalization(model):
        equalize_wrapped(model, qp.equalization)
    for name, role, q in quantizers(model):
        q.load_point(qp.get(name, role), f"{name}:{role}")
        q.mode = "quant"
    return model


def collect_qparams(qmodel: nn.Module, **header) -> QParams:
    qp = QParams(**header, equalization=applied_equalization(qmodel))
    for name, role, q in quantizers(qmodel):
        qp.set(name, role, q.point())
    return qp


@contextlib.contextmanager
def exporting(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Trace-friendly mode: activations become Q/DQ ops and weights int8 initializers."""
    flagged = [m for m in model.modules() if isinstance(m, (_QuantWeighted, Quantizer))]
    _EXPORT_DTYPE[0] = dtype
    for m in flagged:
        m.exporting = True
        if isinstance(m, _QuantWeighted):
            m.prepare_export(dtype)
    try:
        yield model
    finally:
        for m in flagged:
            m.exporting = False
            if isinstance(m, _QuantWeighted):
                m.release_export()
        _EXPORT_DTYPE[0] = torch.float32
