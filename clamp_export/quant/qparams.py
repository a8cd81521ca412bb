"""The contract file ``qparams.json``: written by calibration/search, read by fake-quant and export.

Keyed by module name, then by role (``input``/``weight`` on Linear and Conv modules; ``q``, ``k``,
``attn``, ``v`` on attention modules). Weight axes are in PyTorch layout (0 = output channel); the
exporter maps them to the deployed layout. ``equalization`` (optional) is keyed by block name, then
by role (``norm1``, ``norm2``, ``qk``, ``v``): the per-channel factors of the exact float rewrite
the quantizers were searched on (quant/equalize.py); readers apply it before quantizing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clamp_export import atomic
from clamp_export.errors import UserError
from clamp_export.quant.equalize import Factors, check_factors
from clamp_export.quant.math import level_range
from clamp_export.quant.targets import TargetProfile

# 2 added ``window``, 3 ``equalization``, 4 ``twin`` (files without them read as before)
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
WEIGHT_ROLE = "weight"


@dataclass
class QuantPoint:
    bits: int
    signed: bool
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None  # None: per-tensor
    # [lowest, highest] integer level the graph clips to, where the target lets the levels
    # slide along the int8 grid (TargetProfile.act_window); None: the centred levels of ``bits``
    window: list[int] | None = None
    # twin-uniform levels (quant.math.twin_scale): ``scale`` is the fine part's; the coarse part's
    # is 2^(bits-1) times it, and both parts have zero-point 0 and levels 0 .. 2^(bits-1)-1
    twin: bool = False

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(self.scale, dtype=torch.float32),
            torch.tensor(self.zero_point, dtype=torch.int32),
        )

    @classmethod
    def from_tensors(
        cls,
        bits: int,
        signed: bool,
        scale: torch.Tensor,
        zp: torch.Tensor,
        axis: int | None,
        window: tuple[int, int] | None = None,
        twin: bool = False,
    ) -> QuantPoint:
        return cls(
            bits=bits,
            signed=signed,
            scale=[float(s) for s in scale.flatten()],
            zero_point=[int(z) for z in zp.flatten()],
            axis=axis,
            window=None if window is None else [int(window[0]), int(window[1])],
            twin=twin,
        )


@dataclass
class QParams:
    model: str
    target: str
    bits: str
    modules: dict[str, dict[str, QuantPoint]] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    equalization: Factors = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    def get(self, module: str, role: str) -> QuantPoint:
        try:
            return self.modules[module][role]
        except KeyError:
            raise UserError(
                f"qparams.json has no entry for {module}:{role}; it was made for another "
                "model or bits spec"
            ) from None

    def set(self, module: str, role: str, point: QuantPoint) -> None:
        self.modules.setdefault(module, {})[role] = point

    def points(self) -> list[tuple[str, str, QuantPoint]]:
        return [(m, r, p) for m, roles in self.modules.items() for r, p in roles.items()]

    # -- JSON round-trip -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = {
            m: {r: _point_dict(p) for r, p in roles.items()} for m, roles in self.modules.items()
        }
        if not d["equalization"]:
            del d["equalization"]
        return {"version": d.pop("version"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> QParams:
        if d.get("version") not in READABLE_VERSIONS:
            raise UserError(
                f"qparams.json has schema version {d.get('version')!r}; this clamp-export reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            modules = {
                m: {r: QuantPoint(**p) for r, p in roles.items()}
                for m, roles in d["modules"].items()
            }
            return cls(
                model=d["model"],
                target=d["target"],
                bits=d["bits"],
                modules=modules,
                metadata=d.get("metadata", {}),
                equalization=_factors(d.get("equalization", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"malformed qparams.json: {type(e).__name__}: {e}") from None

    def save(self, path: Path | str) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> QParams:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(f"qparams file {path} not found") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None

    # -- validation ------------------------------------------------------------------------
    def violations(self, profile: TargetProfile) -> list[str]:
        """Every way these parameters break ``profile``, one readable line each."""
        out = check_factors(self.equalization)
        for module, role, p in self.points():
            where = f"{module}:{role}"
            is_weight = role == WEIGHT_ROLE
            if p.bits not in profile.allowed_bits:
                out.append(f"{where}: {p.bits} bits not allowed on {profile.name}")
                continue
            signed = profile.weight_signed if is_weight else profile.act_signed
            symmetric = profile.weight_symmetric if is_weight else profile.act_symmetric
            if p.signed != signed:
                kind = "int" if signed else "uint"
                out.append(f"{where}: {profile.name} needs {kind}{p.bits} levels")
            if len(p.scale) != len(p.zero_point) or not p.scale:
                out.append(f"{where}: {len(p.scale)} scales but {len(p.zero_point)} zero-points")
                continue
            if not all(math.isfinite(s) and s > 0 for s in p.scale):
                out.append(f"{where}: scales must be finite and positive")
            qmin, qmax = level_range(p.bits, p.signed)
            if symmetric and any(z != 0 for z in p.zero_point):
                bad = next(z for z in p.zero_point if z != 0)
                out.append(
                    f"{where}: zero-point {bad} but {profile.name} takes only symmetric "
                    "quantization (zero-point 0)"
                )
            elif any(not qmin <= z <= qmax for z in p.zero_point):
                out.append(f"{where}: zero-point outside [{qmin}, {qmax}]")
            if p.window is not None:
                out.extend(_window_violations(where, p, profile, is_weight))
            if p.twin and (is_weight or p.window is not None or any(p.zero_point)):
                out.append(
                    f"{where}: twin-uniform levels are only for activations, with zero-point 0 "
                    "and no window"
                )
            if is_weight and profile.weight_axis_per_channel and p.axis != 0:
                out.append(f"{where}: weights must be per-output-channel (axis 0)")
            if not is_weight and (p.axis is not None or len(p.scale) != 1):
                out.append(f"{where}: activations must be per-tensor (one scale)")
        return out

    def validate(self, profile: TargetProfile) -> None:
        bad = self.violations(profile)
        if bad:
            more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"qparams violate target {profile.name!r}: {bad[0]}{more}")


def _factors(raw) -> Factors:
    if not isinstance(raw, dict) or not all(
        isinstance(roles, dict) and all(isinstance(f, list) for f in roles.values())
        for roles in raw.values()
    ):
        raise TypeError("equalization must map block -> role -> list of factors")
    return raw


def _point_dict(p: QuantPoint) -> dict:
    d = asdict(p)
    if d["window"] is None:  # the common case: keep files as they were before windows
        del d["window"]
    if not d["twin"]:
        del d["twin"]
    return d


def _window_violations(where: str, p: QuantPoint, profile: TargetProfile, is_weight: bool):
    if is_weight or not profile.act_window or p.bits >= 8:
        kind = "a weight" if is_weight else f"a {p.bits}-bit activation"
        yield (
            f"{where}: level windows are only for activations below 8 bits on a target that "
            f"slides them (trt), not {kind} on {profile.name}"
        )
        return
    if not isinstance(p.window, list) or len(p.window) != 2:
        yield f"{where}: window must be [lowest, highest] level, got {p.window!r}"
    elif p.window[1] - p.window[0] != 2**p.bits - 1:
        yield f"{where}: window {p.window} must span exactly {2**p.bits} levels"
    elif not p.window[0] <= 0 <= p.window[1]:
        yield f"{where}: window {p.window} must hold level 0 (so 0.0 stays exact)"
