"""Parity between a deployed backend and the fake-quant reference (DESIGN §8).

Tolerances follow Polygraphy's comparator: an element passes when
|out - ref| <= atol + rtol * |ref|. Gates use agreement and mean error rather than bit equality,
because fused kernels reorder rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class LogitError:
    max_abs: float
    mean_abs: float
    cosine: float
    within_tol: float  # share of elements within atol + rtol * |ref|

    def to_dict(self) -> dict:
        return asdict(self)


def logit_error(
    out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-2, rtol: float = 1e-2
) -> LogitError:
    diff = (out - ref).abs()
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=1).mean()
    return LogitError(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        cosine=float(cos),
        within_tol=float((diff <= atol + rtol * ref.abs()).double().mean()),
    )


def top1_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.argmax(1) == ref.argmax(1)).double().mean())


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())
