"""Range checks shared by the config dataclasses: a NaN setting is refused where it enters."""

from __future__ import annotations

import math
from dataclasses import fields

from clamp_export.errors import UserError


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _numbers(item)]
    return []


def require_finite(cfg: object, label: str, positive: tuple[str, ...] = ()) -> None:
    """Every number of dataclass ``cfg`` finite; the fields named in ``positive`` above 0."""
    for f in fields(cfg):
        values = _numbers(getattr(cfg, f.name))
        if not all(math.isfinite(v) for v in values):
            raise UserError(
                f"{label} {f.name} must be a finite number, got {getattr(cfg, f.name)!r}"
            )
        if f.name in positive and not all(v > 0 for v in values):
            raise UserError(f"{label} {f.name} must be positive, got {getattr(cfg, f.name)!r}")
