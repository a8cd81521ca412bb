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
from clamp_export.quant.bits import BLOCK_SIZES, BitsSpec
from clamp_export.quant.equalize import Factors, check_factors
from clamp_export.quant.math import level_range
from clamp_export.quant.targets import TargetProfile

# 2 added ``window``, 3 ``equalization``, 4 ``twin``, 5 ``block`` (files without them read as
# before)
SCHEMA_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
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
    # INT4 weight-only (w4a16): one scale per block of ``block`` input channels of each output
    # channel, row-major ([out channel][block]); None: one scale per output channel
    block: int | None = None

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
        block: int | None = None,
    ) -> QuantPoint:
        return cls(
            bits=bits,
            signed=signed,
            scale=[float(s) for s in scale.flatten()],
            zero_point=[int(z) for z in zp.flatten()],
            axis=axis,
            window=None if window is None else [int(window[0]), int(window[1])],
            twin=twin,
            block=block,
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
    def from_dict(cls, d: object) -> QParams:
        if not isinstance(d, dict):
            raise UserError(
                f"malformed qparams.json: the top level is a JSON {type(d).__name__}, not an object"
            )
        if d.get("version") not in READABLE_VERSIONS:
            raise UserError(
                f"qparams.json has schema version {d.get('version')!r}; this clamp-export reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        _check_schema(d)
        modules = {m: {r: _point(p) for r, p in roles.items()} for m, roles in d["modules"].items()}
        return cls(
            model=d["model"],
            target=d["target"],
            bits=d["bits"],
            modules=modules,
            metadata=d.get("metadata", {}),
            equalization=d.get("equalization", {}),
        )

    def save(self, path: Path | str) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path | str) -> QParams:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise UserError(f"qparams file {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read qparams file {path}: {type(e).__name__}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None

    # -- validation ------------------------------------------------------------------------
    def violations(self, profile: TargetProfile) -> list[str]:
        """Every way these parameters break ``profile``, one readable line each."""
        out = check_factors(self.equalization)
        try:
            spec = BitsSpec.parse(self.bits)
        except UserError:
            return [*out, f"bits: {self.bits!r} is not a bits spec (wXaY or mp:W[xA])"]
        for module, role, p in self.points():
            where = f"{module}:{role}"
            is_weight = role == WEIGHT_ROLE
            if p.bits not in profile.allowed_bits:
                out.append(f"{where}: {p.bits} bits not allowed on {profile.name}")
                continue
            want = _expected_bits(spec, module, is_weight)
            if want is not None and p.bits != want:
                out.append(f"{where}: {p.bits}-bit levels in a {self.bits} file (expected {want})")
            if profile.float_dtype == "float16":
                out.extend(_fp16_violations(where, p))
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
            if p.block is not None or spec.weight_only:
                out.extend(_block_violations(where, p, spec, profile, is_weight))
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


_POINT_SCHEMA = {
    "type": "object",
    "required": ["bits", "signed", "scale", "zero_point"],
    "additionalProperties": False,
    "properties": {
        "bits": {"type": "integer"},
        "signed": {"type": "boolean"},
        "scale": {"type": "array", "minItems": 1, "items": {"type": "number"}},
        "zero_point": {"type": "array", "minItems": 1, "items": {"type": "integer"}},
        "axis": {"type": ["integer", "null"]},
        "window": {
            "type": ["array", "null"],
            "items": {"type": "integer"},
            "minItems": 2,
            "maxItems": 2,
        },
        "twin": {"type": "boolean"},
        "block": {"type": ["integer", "null"], "minimum": 1},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["version", "model", "target", "bits", "modules"],
    "properties": {
        "version": {"type": "integer"},
        "model": {"type": "string"},
        "target": {"type": "string"},
        "bits": {"type": "string"},
        "modules": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": _POINT_SCHEMA,
            },
        },
        "metadata": {"type": "object"},
        "equalization": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "number"}},
            },
        },
    },
}


def _check_schema(d: dict) -> None:
    """Types and shape (a string scale, a fractional zero-point) refused with the JSON path."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(d))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise UserError(f"malformed qparams.json at {where}: {error.message}")


def _point(d: dict) -> QuantPoint:
    """A QuantPoint from a schema-checked dict; integral floats (3.0) become ints."""
    d = {**d, "zero_point": [int(z) for z in d["zero_point"]], "bits": int(d["bits"])}
    if d.get("window") is not None:
        d["window"] = [int(v) for v in d["window"]]
    if d.get("axis") is not None:
        d["axis"] = int(d["axis"])
    return QuantPoint(**d)


def _expected_bits(spec: BitsSpec, module: str, is_weight: bool) -> int | None:
    """The width ``spec`` gives a point (None: the mixed-precision search chooses it)."""
    if not module.startswith("blocks."):
        return spec.edge  # the patch embedding and the head(s)
    if spec.mixed:
        return None if is_weight or spec.mp_act is not None else spec.act
    return spec.weight if is_weight else spec.act


_FP16 = torch.finfo(torch.float16)


def _fp16_violations(where: str, p: QuantPoint):
    """A float16 graph stores the scale and level x scale: both must stay normal and finite."""
    levels = 2 ** (p.bits - 1) if p.signed else 2**p.bits - 1
    for s in p.scale:
        if math.isfinite(s) and s > 0 and not (_FP16.tiny <= s and s * levels <= _FP16.max):
            yield (
                f"{where}: scale {s:g} does not fit the float16 graph (scale >= {_FP16.tiny:.3g} "
                f"and scale x {levels} levels <= {_FP16.max:g})"
            )
            return


def _point_dict(p: QuantPoint) -> dict:
    d = asdict(p)
    if d["window"] is None:  # the common case: keep files as they were before windows
        del d["window"]
    if not d["twin"]:
        del d["twin"]
    if d["block"] is None:
        del d["block"]
    return d


def _block_violations(
    where: str, p: QuantPoint, spec: BitsSpec, profile: TargetProfile, is_weight: bool
):
    """INT4 weight-only: blocked int4 weights of the block linears, nothing else quantized."""
    if not profile.weight_only_blocks:
        yield f"{where}: blocked INT4 weight-only (w4a16) is TensorRT's format, not {profile.name}'s"
    elif not spec.weight_only:
        yield f"{where}: weight blocks in a {spec} file (blocks are for w4a16)"
    elif not is_weight:
        yield f"{where}: a w4a16 file keeps activations in FP16: no activation quant points"
    elif p.block not in BLOCK_SIZES:
        yield f"{where}: block size {p.block}; TensorRT runs blocks of 64 or 128"


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
