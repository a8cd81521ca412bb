"""Name-keyed model registry: short aliases to timm names, plus the project's reference models.

Any timm ViT/DeiT name works as well; aliases only save typing and carry the architecture of the
reference models that no hub knows about.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.layers import set_fused_attn

from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass(frozen=True)
class ModelSpec:
    """What an alias stands for: a timm architecture, its kwargs and (for reference models) weights."""

    timm_name: str
    kwargs: dict = field(default_factory=dict)
    preprocess: Preprocess | None = None  # None: take it from timm's pretrained cfg
    bundled_weights: str | None = None  # file under REFERENCE_DIR


def _fmnist_reference(name: str, **shape) -> ModelSpec:
    """A Fashion-MNIST reference model: 28 px grey images in 4 px patches, 10 classes, its
    weights bundled as NAME.safetensors."""
    return ModelSpec(
        "vit_tiny_patch16_224",
        kwargs=dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, **shape),
        preprocess=Preprocess(mean=FMNIST_MEAN, std=FMNIST_STD, input_size=(1, 28, 28)),
        bundled_weights=f"{name}.safetensors",
    )


ALIASES: dict[str, ModelSpec] = {
    "deit_t": ModelSpec("deit_tiny_patch16_224"),
    "deit_s": ModelSpec("deit_small_patch16_224"),
    "deit_b": ModelSpec("deit_base_patch16_224"),
    "deit_t_distilled": ModelSpec("deit_tiny_distilled_patch16_224"),
    "deit_s_distilled": ModelSpec("deit_small_distilled_patch16_224"),
    "deit_b_distilled": ModelSpec("deit_base_distilled_patch16_224"),
    "vit_s": ModelSpec("vit_small_patch16_224"),
    "vit_b": ModelSpec("vit_base_patch16_224"),
    # Reference model trained by scripts/train_fmnist_vit.py (DESIGN §7): 7x7 patch grid.
    "fmnist_vit": _fmnist_reference(
        "fmnist_vit", embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0
    ),
    # Second reference model (scripts/train_fmnist_vit_reg4.sh), of another shape: 4 register
    # tokens beside the class token (5 prefix tokens), deeper and narrower, 6 heads of 16 dims,
    # MLP ratio 4. Defaults are kept only where they hold on both reference models.
    "fmnist_vit_reg4": _fmnist_reference(
        "fmnist_vit_reg4", embed_dim=96, depth=8, num_heads=6, mlp_ratio=4.0, reg_tokens=4
    ),
}

REFERENCE_MODELS = tuple(name for name, spec in ALIASES.items() if spec.bundled_weights)


def _is_vit_name(name: str) -> bool:
    return name in timm.list_models(["vit_*", "deit*", "eva*", "flexivit*"])


def resolve(name: str) -> ModelSpec:
    """Alias or timm name -> spec; unknown names get a close-match suggestion."""
    if name in ALIASES:
        return ALIASES[name]
    if _is_vit_name(name):
        return ModelSpec(name)
    candidates = list(ALIASES) + timm.list_models(["vit_*", "deit*"])
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(close)}?" if close else f"; known aliases: {', '.join(ALIASES)}"
    )
    raise UserError(f"unknown model {name!r}{hint}")


def _check_pretrained_reachable(timm_name: str) -> None:
    """Fail at once, not after a minute of hub retries, when weights are neither cached nor
    downloadable."""
    import socket

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return  # weights from a URL: let timm try (it reports its own failure)
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, fname), str):
            return
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        raise UserError(
            f"no pretrained weights for {timm_name} in the local cache and the hub is unreachable "
            "(offline?); pass --weights FILE"
        ) from None


def create(
    spec: ModelSpec, *, pretrained: bool, model_kwargs: dict | None = None
) -> torch.nn.Module:
    """Instantiate with attention unfused so the two attention matmuls are visible (DESIGN §2)."""
    kwargs = {**spec.kwargs, **(model_kwargs or {})}
    set_fused_attn(False)
    os.environ.setdefault("TIMM_FUSED_ATTN", "0")
    if pretrained:
        _check_pretrained_reachable(spec.timm_name)
    try:
        model = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as e:
        raise UserError(
            f"bad model argument for {spec.timm_name}: {e or 'rejected by timm'}"
        ) from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise UserError(
                f"could not fetch pretrained weights for {spec.timm_name} "
                f"({type(e).__name__}); offline? pass --weights FILE"
            ) from None
        raise UserError(f"cannot build {spec.timm_name}: {e}") from None
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{spec.timm_name} is a {type(model).__name__}; clamp-export handles timm "
            "VisionTransformer models (ViT, DeiT)"
        )
    check_layout(model, spec.timm_name)
    return model.eval()


def preprocess_for(spec: ModelSpec, model: torch.nn.Module) -> Preprocess:
    """The alias's constants (or timm's pretrained cfg), at the size and channels the model was
    built for: --img-size and --in-chans change the model, so its input follows."""
    in_chans = model.patch_embed.proj.in_channels
    h, w = model.patch_embed.img_size
    if spec.preprocess is not None:
        mean, std, interpolation = (
            spec.preprocess.mean,
            spec.preprocess.std,
            spec.preprocess.interpolation,
        )
    else:
        cfg = timm.data.resolve_data_config({}, model=model)
        mean, std, interpolation = tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]
    if len(mean) != in_chans:  # e.g. --in-chans 1 on an RGB architecture, or 3 on a grey one
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(mean=mean, std=std, input_size=(in_chans, h, w), interpolation=interpolation)


# timm global_pool values whose pooling the fake-quant model and the graph both compute in float
SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")


def check_layout(model: torch.nn.Module, timm_name: str) -> None:
    """Refuse at load time what the fake-quant wrapping does not cover, saying what it does."""
    pool = getattr(model, "global_pool", "token")
    if pool not in SUPPORTED_POOLS or getattr(model, "attn_pool", None) is not None:
        raise UserError(
            f"{timm_name} with global_pool={pool!r} is not supported; clamp-export takes "
            f"global_pool {', '.join(repr(p) for p in SUPPORTED_POOLS)} (class token or pooled tokens)"
        )
