"""The ViT cut into stages, so a candidate for one layer re-runs only what it changes.

``embed(x)`` runs everything before the blocks; ``tail(h, start)`` runs blocks[start:], the final
norm and the head. A layer in block b needs only the (cached) input of block b.
"""

from __future__ import annotations

import torch
from torch import nn

from clamp_export.quant.fakequant import QuantAttention, _QuantWeighted, layer_points


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def tail(model: nn.Module, h: torch.Tensor, start: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(outputs of blocks ``start``.., logits) from the input of block ``start``."""
    outs = []
    for blk in model.blocks[start:]:
        h = blk(h)
        outs.append(h)
    return outs, model.forward_head(model.norm(h))


def head_only(model: nn.Module, h_last: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.norm(h_last))


def searchable_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, stage) in forward order; stage -1 = before the blocks, len(blocks) = head."""
    depth = len(model.blocks)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (_QuantWeighted, QuantAttention)) or not layer_points(mod):
            continue  # w4a16: attention and the FP16 edges hold no quant point
        if name.startswith("blocks."):
            stage = int(name.split(".")[1])
        elif name.startswith("patch_embed"):
            stage = -1
        else:
            stage = depth
        out.append((name, mod, stage))
    return out
