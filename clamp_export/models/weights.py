"""Loading user weights: .safetensors, torch state dicts, and timm/DeiT checkpoint dicts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clamp_export.errors import UserError

_NESTED_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise a zoo of types from both loaders
        raise UserError(
            f"cannot read weights file {path}: it is corrupt or not a weights file ({e})"
        ) from None
    if isinstance(state, dict):
        for key in _NESTED_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fit_to_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own filter: converts original JAX/DeiT layouts, resamples position embeddings."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        return checkpoint_filter_fn(state, model)
    except Exception:  # an unusual layout: let the strict load below report it precisely
        return state


def load_weights(model: nn.Module, path: Path | str, user_num_classes: int | None = None) -> None:
    """Load strictly; any disagreement is reported with the keys or shapes involved."""
    state = _fit_to_model(read_state_dict(path), model)
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
    model.load_state_dict(state)
