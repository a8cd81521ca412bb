"""Loading user weights: .safetensors, torch state dicts, and timm/DeiT checkpoint dicts.

Everything a file can get wrong is said before the model is used, naming the tensor: another
architecture (compared before the class count, so the advice fits), integer or non-finite
tensors, and position embeddings of another grid. timm resamples those to a new image size; we let
it only when the user asked for a size, and say so.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from clamp_export.errors import UserError
from clamp_export.tensorfile import read_tensor_file

_NESTED_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    state = read_tensor_file(path, "weights file")
    if isinstance(state, dict):
        for key in _NESTED_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def architecture(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What a timm ViT state dict says about its shape; empty for layouts timm must convert."""
    pe = state.get("patch_embed.proj.weight")
    if pe is None or pe.dim() != 4:
        return {}
    depth = 1 + max(
        (
            int(k.split(".")[1])
            for k in state
            if k.startswith("blocks.") and k.split(".")[1].isdigit()
        ),
        default=-1,
    )
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    reg = state.get("reg_token")
    return {
        "embed dim": pe.shape[0],
        "input channels": pe.shape[1],
        "patch size": "x".join(map(str, pe.shape[2:])),
        "depth": depth,
        "MLP width": None if fc1 is None else fc1.shape[0],
        "class token": "cls_token" in state,
        "register tokens": 0 if reg is None else reg.shape[1],
    }


def _check_architecture(path: Path | str, state: dict, model: nn.Module) -> None:
    theirs, ours = architecture(state), architecture(model.state_dict())
    diffs = [
        f"{k} {theirs[k]} vs {ours[k]}"
        for k in ours
        if k in theirs and theirs[k] is not None and theirs[k] != ours[k]
    ]
    if diffs:
        raise UserError(
            f"weights in {path} are for another architecture (file vs model: {'; '.join(diffs)}); "
            "name the model they were trained as, or match it with --in-chans and --model-arg"
        )


def _grid(tokens: int, prefix: int) -> int | None:
    side = math.isqrt(max(tokens - prefix, 0))
    return side if side * side == tokens - prefix else None


def _check_position_grid(path, state: dict, model: nn.Module, resample_ok: bool) -> str | None:
    """None when the file's position embeddings fit; a note when they are to be resampled."""
    pos, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    theirs, ours = _grid(pos.shape[1], prefix), _grid(own.shape[1], prefix)
    if theirs is None or ours is None:
        return None  # not a square grid: the strict shape check reports it
    patch = model.patch_embed.patch_size[0]
    if not resample_ok:
        raise UserError(
            f"weights in {path} hold position embeddings for a {theirs}x{theirs} patch grid but the "
            f"model has {ours}x{ours}; pass --img-size {theirs * patch} to load them as trained, or "
            f"--img-size {ours * patch} to resample them to this size on purpose"
        )
    return (
        f"resampled the position embeddings of {Path(path).name} from a {theirs}x{theirs} to a "
        f"{ours}x{ours} patch grid (--img-size {ours * patch}); accuracy is not the file's own"
    )


def _fit_to_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own filter: converts original JAX/DeiT layouts, resamples position embeddings."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        return checkpoint_filter_fn(state, model)
    except Exception:  # an unusual layout: let the strict load below report it precisely
        return state


def _check_values(path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    for k, t in own.items():
        v = state[k]
        if t.is_floating_point() and not v.is_floating_point():
            raise UserError(
                f"weights in {path}: {k} is {str(v.dtype).removeprefix('torch.')}, but the model "
                "needs floating-point weights (is it a quantized or converted checkpoint?)"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(
                f"weights in {path}: {k} holds {bad} NaN/Inf value(s) of {v.numel()}; the file is "
                "corrupt or the training diverged"
            )


def load_weights(
    model: nn.Module,
    path: Path | str,
    user_num_classes: int | None = None,
    resample_ok: bool = False,
) -> list[str]:
    """Load strictly; any disagreement is reported with the keys or shapes involved.

    Returns notes to show and record (a resampling that ``resample_ok`` allowed).
    """
    raw = read_state_dict(path)
    _check_architecture(path, raw, model)
    note = _check_position_grid(path, raw, model, resample_ok)
    state = _fit_to_model(raw, model)
    head = state.get("head.weight")
    model_head = getattr(model, "head", None)
    if (
        head is not None
        and isinstance(model_head, nn.Linear)
        and head.shape[0] != model_head.out_features
    ):
        fix = (
            f"drop --num-classes or pass --num-classes {head.shape[0]}"
            if user_num_classes is not None
            else f"pass --num-classes {head.shape[0]}"
        )
        raise UserError(
            f"weights in {path} have {head.shape[0]} classes but the model has "
            f"{model_head.out_features}; {fix}"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"weights in {path} do not fit the model: missing keys {missing[:4]}"
            f"{'…' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
            f"{'…' if len(unexpected) > 4 else ''}; check the model name and --model-arg values"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise UserError(
            f"weights in {path} do not fit the model: {k} is {tuple(state[k].shape)} in the file "
            f"but {tuple(own[k].shape)} in the model ({len(bad)} mismatched tensors); check "
            "--img-size, --in-chans and --model-arg"
        )
    _check_values(path, state, own)
    model.load_state_dict(state)
    return [note] if note else []
