"""Channel equalization: exact float rewrites of a ViT block that even out per-tensor ranges.

A per-tensor 4-bit activation spends its 16 levels on the widest channel. Three rewrites change
which tensor carries a channel's magnitude without changing what the block computes in float:

- ``norm1`` / ``norm2``: divide LayerNorm output channel c by r_c (its affine weight and bias) and
  multiply column c of the linear that reads it (``attn.qkv`` / ``mlp.fc1``) by r_c;
- ``qk``: multiply query channel c by a_c and key channel c by 1 / a_c (rows of ``attn.qkv``), so
  every q·k product, hence the attention, is unchanged;
- ``v``: divide value channel c by r_c (rows of ``attn.qkv``) and multiply column c of
  ``attn.proj`` by r_c (``attn @ v`` is linear in each channel of v).

The factors come from float activation ranges on the calibration images (no other data), and
travel in ``qparams.json`` so export and fake-quant rebuild the same model. The rewrite is the
RepQ-ViT LayerNorm reparameterization plus its SmoothQuant-style analogues inside attention.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clamp_export.errors import UserError

ROLES = ("norm1", "norm2", "qk", "v")
# q and k meet halfway: each carries the square root of their range ratio
QK_MIGRATION = 0.5

Factors = dict[str, dict[str, list[float]]]  # block name -> role -> one factor per channel
_APPLIED = "clamp_equalization"  # the factors a model carries, so a rewrite is never applied twice


def applied_equalization(model: nn.Module) -> Factors:
    return getattr(model, _APPLIED, {})


def _eligible(model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """(block name, block, roles that are exact rewrites of that block)."""
    from timm.models.vision_transformer import Block

    out = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        if not isinstance(blk, Block):  # other layouts (parallel, post-norm) do not chain this way
            continue
        attn = blk.attn
        roles = [
            nm
            for nm in ("norm1", "norm2")
            if isinstance(getattr(blk, nm), nn.LayerNorm)
            and getattr(blk, nm).elementwise_affine
            and getattr(blk, nm).bias is not None
        ]
        if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
            roles.append("qk")  # a q/k LayerNorm would undo the rescaling
        if isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            roles.append("v")
        out.append((f"blocks.{i}", blk, tuple(roles)))
    return out


def _width(attn: nn.Module) -> int:
    return attn.num_heads * attn.head_dim


@torch.no_grad()
def equalization_factors(fp_model: nn.Module, images: torch.Tensor) -> Factors:
    """Factors from the float model's per-channel absolute maxima on ``images``."""
    amax: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []
    blocks = _eligible(fp_model)

    def keep(key):
        def hook(_m, _a, out):
            amax[key] = out.detach().flatten(0, -2).abs().amax(0).float().cpu()

        return hook

    for name, blk, roles in blocks:
        for nm in ("norm1", "norm2"):
            if nm in roles:
                hooks.append(getattr(blk, nm).register_forward_hook(keep((name, nm))))
        hooks.append(blk.attn.qkv.register_forward_hook(keep((name, "qkv"))))
    try:
        fp_model(images)
    finally:
        for h in hooks:
            h.remove()

    factors: Factors = {}
    for name, blk, roles in blocks:
        c = _width(blk.attn)
        q, k, v = (amax[(name, "qkv")][i * c : (i + 1) * c].clamp(min=1e-5) for i in range(3))
        per: dict[str, torch.Tensor] = {}
        for nm in ("norm1", "norm2"):
            if nm in roles:
                h = amax[(name, nm)].clamp(min=1e-5)
                per[nm] = h / h.mean()
        if "qk" in roles:
            per["qk"] = (k / q) ** QK_MIGRATION
        if "v" in roles:
            per["v"] = v / v.mean()
        factors[name] = {role: [float(f) for f in t] for role, t in per.items()}
    return factors


def check_factors(factors: Factors) -> list[str]:
    """Problems with the factors as data (the model checks lengths when they are applied)."""
    out = []
    for name, roles in factors.items():
        for role, f in roles.items():
            if role not in ROLES:
                out.append(f"{name}:{role}: unknown equalization role (known: {', '.join(ROLES)})")
            elif not f or not all(isinstance(x, (int, float)) and 0 < x < float("inf") for x in f):
                out.append(f"{name}:{role}: equalization factors must be finite and positive")
    return out


@torch.no_grad()
def apply_equalization(model: nn.Module, factors: Factors) -> nn.Module:
    """Rewrite ``model`` in place (a float timm ViT or its fake-quant wrapper: same names).

    A model that already carries these factors is left as it is; one that carries others is refused.
    """
    already = applied_equalization(model)
    if already == factors:
        return model
    if already:
        raise UserError(
            "this model is already equalized with other factors; build it again from the float "
            "model before loading this qparams.json"
        )
    blocks = {name: (blk, roles) for name, blk, roles in _eligible(model)}
    for name, per in factors.items():
        if name not in blocks:
            raise UserError(f"qparams.json equalizes {name}, which this model does not have")
        blk, allowed = blocks[name]
        attn = blk.attn
        c = _width(attn)
        w, b = attn.qkv.weight, attn.qkv.bias
        for role, f in per.items():
            if role not in allowed:
                raise UserError(f"{name}:{role} cannot be equalized exactly in this model")
            r = torch.tensor(f, dtype=w.dtype, device=w.device)
            expected = getattr(blk, role).normalized_shape[0] if role in ("norm1", "norm2") else c
            if r.numel() != expected:
                raise UserError(
                    f"{name}:{role} has {r.numel()} equalization factors for {expected} channels; "
                    "qparams.json was made for another model"
                )
            if role in ("norm1", "norm2"):
                ln = getattr(blk, role)
                reader = attn.qkv if role == "norm1" else blk.mlp.fc1
                ln.weight /= r
                ln.bias /= r
                reader.weight *= r[None, :]
            elif role == "qk":
                w[:c] *= r[:, None]
                w[c : 2 * c] /= r[:, None]
                if b is not None:
                    b[:c] *= r
                    b[c : 2 * c] /= r
            else:  # v
                w[2 * c :] /= r[:, None]
                if b is not None:
                    b[2 * c :] /= r
                attn.proj.weight *= r[None, :]
    setattr(model, _APPLIED, factors)
    return model


def equalized(fp_model: nn.Module, factors: Factors) -> nn.Module:
    """An equalized copy; the original is left untouched."""
    return apply_equalization(copy.deepcopy(fp_model), factors)
