"""Parity between a deployed backend and the fake-quant reference (DESIGN §8), by Polygraphy.

Polygraphy's comparators do the arithmetic: ``SimpleCompareFunc`` gives the absolute-error
statistics (max, mean, p99) and its atol/rtol verdict on the p99 error, which fails only when
both the absolute and the relative error exceed their tolerance, relative to the second output,
so the reference goes second; ``CosineSimilarityCompareFunc`` gives the cosine. Gates use
agreement and mean error rather than bit equality, because fused kernels reorder rounding.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")  # harmless where TensorRT is absent


@dataclass
class LogitError:
    max_abs: float
    mean_abs: float
    p99_abs: float
    cosine: float
    within_tol: bool  # Polygraphy's verdict: p99 error within atol or rtol

    def to_dict(self) -> dict:
        return asdict(self)


def _quiet() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-comparison report is ours to write
    G_LOGGER.colors = False  # and it would warn, once, that the colored module is missing


def logit_error(
    out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-2, rtol: float = 1e-2
) -> LogitError:
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    _quiet()
    a = IterationResult({"logits": out.float().numpy()}, runner_name="out")
    b = IterationResult({"logits": ref.float().numpy()}, runner_name="ref")
    simple = SimpleCompareFunc(
        atol=atol, rtol=rtol, check_error_stat="quantile", error_quantile=0.99
    )(a, b)["logits"]
    cosine = CosineSimilarityCompareFunc(cosine_similarity_threshold=0.0)(a, b)["logits"]
    return LogitError(
        max_abs=float(simple.max_absdiff),
        mean_abs=float(simple.mean_absdiff),
        p99_abs=float(simple.quantile_absdiff),
        cosine=float(cosine.cosine_similarity),
        within_tol=bool(simple),
    )


def top1_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.argmax(1) == ref.argmax(1)).double().mean())


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())
