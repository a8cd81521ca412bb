"""Stage 1 configuration: plain data, named presets, JSON round-trip (stored beside every output).

Fields marked *(ours)* in DESIGN §6 are choices the paper leaves open; each is a field here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from clamp_export.checks import require_finite
from clamp_export.errors import UserError

METHODS = ("clamp", "psaq", "noise")


@dataclass(frozen=True)
class SynthConfig:
    method: str = "clamp"
    n: int = 32
    steps: int = 500
    lr: float = 0.2
    beta1: float = 0.5
    beta2: float = 0.9
    tau: float = 0.2  # InfoNCE temperature (ours: swept 0.1-0.5)
    neighbourhood: int = 3  # size of the spatial window around each anchor
    top_k: int = 4  # positives per anchor
    w_patch: float = 1.0  # weight of the patch loss (InfoNCE for clamp, -entropy for psaq)
    w_ce: float = 1.0  # cross-entropy toward random target classes (PSAQ prior, ours for clamp)
    w_tv: float = 0.05  # total variation
    jitter: int = 1  # random shift in pixels, per step
    flip: bool = True
    kde_bandwidth: float = 0.05  # psaq only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(
                f"unknown synth method {self.method!r}; choose one of: {', '.join(METHODS)}"
            )
        if self.n < 1:
            raise UserError(f"--n must be at least 1, got {self.n}")
        if self.steps < 0 or self.neighbourhood % 2 == 0 or self.neighbourhood < 3:
            raise UserError("steps must be >= 0 and the neighbourhood an odd size >= 3")
        if not 1 <= self.top_k < self.neighbourhood**2:
            raise UserError(f"top_k must be in 1..{self.neighbourhood**2 - 1}")
        require_finite(self, "synth", positive=("lr", "tau", "kde_bandwidth"))
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.jitter < 0:
            raise UserError("synth betas must lie in [0, 1) and the jitter be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown synth config fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, SynthConfig] = {
    "default": SynthConfig(),
    "fast": SynthConfig(steps=150, lr=0.25),
}


def preset(name: str, **overrides) -> SynthConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
