"""The FP16 graph's arithmetic, emulated in FP32 by rounding where the graph stores a tensor.

In the strongly typed FP16 graph (`trt` profile) every op writes an FP16 tensor: the LayerNorms,
the matmuls and their bias adds, the attention scale, the softmax, each op of the decomposed GELU
(opset 19 has no Gelu op), the residual adds and every DequantizeLinear. At 4-bit activations a
value one FP16 ulp away from its FP32 twin crosses a level boundary often enough to matter (97.8%
agreement between the FP16 graph and an FP32-arithmetic fake-quant model on ``fmnist_vit_reg4``
W4A4), so the fake-quant model rounds at those points too, and the search and the scale
refinement optimize what is deployed. Each op itself runs in FP32 and its result is rounded once,
which is what ONNX Runtime's CPU kernels do with FP16 tensors (they compute in FP32). Rounding, not
``model.half()``: half-precision matmuls on these CPUs are slower than FP32 ones. The matmuls and
the conv between quant points sum their integer levels exactly, as TensorRT's INT8 kernels do
(``fakequant._matmul``): a float sum's order is each kernel's own, and one ulp of it moves a
4-bit level downstream.

Rounding applies to FP32 tensors only: the exported copy runs in real FP16 while it is traced, and
then every rounding step is a no-op that writes no node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from clamp_export.errors import UserError

# the decomposed GELU's divisor, as the FP16 graph stores it (sqrt(2) -> 1.4140625)
_SQRT2_FP16 = float(torch.tensor(math.sqrt(2.0)).half())


def to_fp16_grid(x: torch.Tensor) -> torch.Tensor:
    """An FP32 tensor rounded to the nearest FP16 value; other dtypes unchanged."""
    return x.half().float() if x.dtype == torch.float32 else x


def to_fp16_grid_(x: torch.Tensor) -> torch.Tensor:
    """``to_fp16_grid`` for a result just computed that nothing else holds: rounded in place
    where autograd does not record it. A search or calibration forward pass rounds a few hundred
    such results; writing them back into their own FP32 storage, instead of a new tensor, saves
    4-8% of a `trt` fake-quant forward pass with the same values (docs/results.md, "FP16
    rounding in place")."""
    if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return to_fp16_grid(x)
    return x.copy_(x.half())


def _rounded_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return to_fp16_grid(out)


class GraphGELU(nn.Module):
    """Exact GELU as opset 19 writes it: x * (erf(x / 1.414) + 1) * 0.5, each op rounded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return F.gelu(x)  # traced in FP16: the exporter writes the decomposition itself
        r = to_fp16_grid_  # each op's result is new, so it is rounded in place
        return r(r(x * r(r(torch.erf(r(x / _SQRT2_FP16))) + 1.0)) * 0.5)


class FP16Block(Block):
    """timm's pre-norm Block with each residual add (and LayerScale) stored in FP16. A subclass,
    swapped in by ``__class__``, so parameter names and the equalization's ``isinstance`` check
    stay those of the original block."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        r = to_fp16_grid_  # each sum and branch output is new, so it is rounded in place
        branch = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        x = r(x + r(self.drop_path1(branch)))
        return r(x + r(self.drop_path2(self.ls2(self.mlp(self.norm2(x))))))


def emulate_fp16_graph(qmodel: nn.Module) -> None:
    """Make a wrapped ViT round where its FP16 graph stores tensors, outside the quant modules
    (which round their own products: ``fakequant``)."""
    for i, blk in enumerate(qmodel.blocks):
        if type(blk) is not Block:
            raise UserError(
                f"blocks.{i} is a {type(blk).__name__}; the trt target's FP16 arithmetic is "
                "modelled for timm's standard pre-norm Block only (use --target ort)"
            )
        blk.__class__ = FP16Block
        act = blk.mlp.act
        if isinstance(act, nn.GELU) and act.approximate == "none":
            blk.mlp.act = GraphGELU()
        else:
            act.register_forward_hook(_rounded_output)
    for m in qmodel.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(_rounded_output)
    qmodel.pos_drop.register_forward_hook(_rounded_output)  # the position-embedding add
