"""Alias/timm name + weights + kwargs -> a ready float model with its preprocessing."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from clamp_export.atomic import sha256_file
from clamp_export.errors import UserError
from clamp_export.models import registry
from clamp_export.models.preprocess import Preprocess
from clamp_export.models.weights import load_weights


@dataclass
class LoadedModel:
    name: str
    timm_name: str
    model: nn.Module
    preprocess: Preprocess
    weights: str  # "bundled:FILE", a path, "timm-pretrained" or "random"
    weights_sha256: str | None
    notes: list[str] = field(default_factory=list)  # said once and recorded in the report
    model_kwargs: dict = field(default_factory=dict)  # what timm.create_model was given
    load_args: dict = field(default_factory=dict)  # load_model(**load_args) builds it again


def parse_model_args(items: tuple[str, ...] | list[str]) -> dict:
    """KEY=VALUE pairs for timm.create_model; values are Python literals when they parse as one."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(
                f"malformed --model-arg {item!r}: expected KEY=VALUE, e.g. drop_rate=0.1"
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _check_shape_args(kwargs: dict) -> None:
    for key, least, why in (
        ("num_classes", 1, "clamp-export needs the classifier head for top-1 and parity"),
        ("img_size", 1, "an image has at least one pixel"),
        ("in_chans", 1, "an image has at least one channel"),
    ):
        v = kwargs.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            flag = f"--{key.replace('_', '-')}"
            raise UserError(f"{flag} must be an integer of at least {least}, got {v!r}; {why}")


def _check_preprocess(pre: Preprocess) -> None:
    for label, values in (("mean", pre.mean), ("std", pre.std)):
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--{label} {','.join(map(str, values))} is not finite")
    if not all(v > 0 for v in pre.std):
        raise UserError(
            f"--std {','.join(map(str, pre.std))} must be positive: images are divided by it"
        )


def load_model(
    name: str,
    weights: Path | str | None = None,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    model_args: dict | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    random_init: bool = False,
) -> LoadedModel:
    spec = registry.resolve(name)
    kwargs = dict(model_args or {})
    for key, value in (
        ("num_classes", num_classes),
        ("img_size", img_size),
        ("in_chans", in_chans),
    ):
        if value is not None:
            kwargs[key] = value
    _check_shape_args(kwargs)
    bundled = registry.REFERENCE_DIR / spec.bundled_weights if spec.bundled_weights else None
    if weights is None and bundled is not None and not random_init and not bundled.is_file():
        raise UserError(f"bundled weights {bundled} are missing; reinstall clamp-export")
    pretrained = weights is None and bundled is None and not random_init
    model = registry.create(spec, pretrained=pretrained, model_kwargs=kwargs)
    source, digest, notes = "random", None, []
    file = Path(weights) if weights is not None else bundled
    if file is not None and not random_init:
        # position embeddings are resampled only for a size the user asked for
        notes = load_weights(
            model, file, user_num_classes=num_classes, resample_ok="img_size" in kwargs
        )
        source = str(weights) if weights is not None else f"bundled:{bundled.name}"
        digest = sha256_file(file)
    elif pretrained:
        source = "timm-pretrained"
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        digest = cfg.get("hf_hub_id") or cfg.get("url") or spec.timm_name
    pre = registry.preprocess_for(spec, model)
    if mean is not None or std is not None:
        c = pre.input_size[0]
        for label, v in (("--mean", mean), ("--std", std)):
            if v is not None and len(v) not in (1, c):
                raise UserError(f"{label} needs 1 or {c} values, got {len(v)}")
        pre = replace(
            pre,
            mean=tuple(mean) * (c // len(mean)) if mean else pre.mean,
            std=tuple(std) * (c // len(std)) if std else pre.std,
        )
    _check_preprocess(pre)
    load_args = dict(
        name=name,
        weights=None if weights is None else str(weights),
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        model_args=dict(model_args or {}),
        mean=mean,
        std=std,
        random_init=random_init,
    )
    return LoadedModel(
        name,
        spec.timm_name,
        model.eval(),
        pre,
        source,
        digest,
        notes,
        model_kwargs={**spec.kwargs, **kwargs},
        load_args=load_args,
    )
