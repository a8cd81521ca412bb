"""Mixed precision: per-layer bit-widths under a budget, chosen by the search's own fitness.

*(ours)* Sensitivity-guided greedy allocation: every searchable point is scored at every allowed
bit-width (the others held at 8, parameters from their calibration range), then bits are lowered
one step at a time where the fitness cost per saved bit is smallest, until the budget holds. The
evolutionary search then refines the scales at those widths. Weight budgets are averaged over
parameters (what memory sees); activation budgets over quant points, as the paper reports them.
The patch embedding and the head keep 8 bits (DESIGN §2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from clamp_export.errors import UserError
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.fakequant import QuantAttention, Quantizer, _QuantWeighted
from clamp_export.quant.targets import TargetProfile
from clamp_export.search.config import SearchConfig

ARTIFACT_FLOAT_BYTES = {"float16": 2, "float32": 4}


@dataclass
class Allocation:
    weight_bits: dict[str, int]  # module -> bits of its weight
    act_bits: dict[str, int]  # "module:role" -> bits
    avg_weight_bits: float
    avg_act_bits: float
    packed_mb: float  # weights at their bit-widths + float parameters, as if packed


def _block_points(
    qmodel: nn.Module,
) -> tuple[list[tuple[str, Quantizer, int]], list[tuple[str, Quantizer]]]:
    """(weight quantizers with their parameter counts, activation quantizers) inside the blocks."""
    weights, acts = [], []
    for name, mod in qmodel.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(mod, _QuantWeighted):
            weights.append((name, mod.weight_q, mod.weight.numel()))
            acts.append((f"{name}:input", mod.input_q))
        elif isinstance(mod, QuantAttention):
            acts += [(f"{name}:{r}", getattr(mod, r)) for r in ("q", "k", "attn", "v")]
    return weights, acts


def packed_mb(qmodel: nn.Module, float_dtype: str) -> float:
    """Size if every quantized weight were stored at its bit-width, the rest in the graph's float."""
    quantized, total = 0.0, 0
    ids = set()
    for mod in qmodel.modules():
        if isinstance(mod, _QuantWeighted):
            quantized += mod.weight.numel() * mod.weight_q.bits / 8
            ids.add(id(mod.weight))
    for p in qmodel.parameters():
        if id(p) not in ids:
            total += p.numel()
    return (quantized + total * ARTIFACT_FLOAT_BYTES[float_dtype]) / 2**20


def budget_to_weight_bits(qmodel: nn.Module, budget_mb: float, profile: TargetProfile) -> float:
    """Average block-weight bits that make ``packed_mb`` meet ``budget_mb``."""
    weights, _ = _block_points(qmodel)
    n = sum(c for _, _, c in weights)
    at8 = packed_mb(qmodel, profile.float_dtype)  # the wrapper starts at 8 bits
    fixed = at8 - n / 2**20
    bits = (budget_mb - fixed) * 2**20 * 8 / n
    lo = min(profile.allowed_bits)
    if bits < lo:
        smallest = fixed + n * lo / 8 / 2**20
        raise UserError(
            f"--budget-mb {budget_mb:g} is impossible: at {lo} bits everywhere the model still takes "
            f"{smallest:.3f} MB; the minimum budget is {smallest:.3f}"
        )
    return min(bits, 8.0)


def _greedy(
    points: list, costs: dict, sizes: dict, current: dict, choices: list[int], budget: float
) -> None:
    def avg() -> float:
        return sum(current[k] * sizes[k] for k in current) / sum(sizes.values())

    while avg() > budget + 1e-9:
        best, best_rate = None, float("inf")
        for k in points:
            lower = [b for b in choices if b < current[k]]
            if not lower:
                continue
            b = max(lower)
            rate = (costs[k][b] - costs[k][current[k]]) / ((current[k] - b) * sizes[k])
            if rate < best_rate:
                best, best_rate = (k, b), rate
        if best is None:
            break
        current[best[0]] = best[1]


def allocate(
    qmodel: nn.Module,
    evaluate,
    profile: TargetProfile,
    weight_budget: float,
    act_budget: float | None,
) -> Allocation:
    """Set per-point bits on ``qmodel`` (calibrated, in quant mode) and return the allocation.

    ``evaluate()`` scores the model as it is (the search's model fitness).
    """
    choices = sorted(b for b in profile.allowed_bits if 2 <= b <= 8)
    if weight_budget < choices[0] or (act_budget is not None and act_budget < choices[0]):
        raise UserError(
            f"mixed-precision budget below the smallest allowed width: {profile.name} allows "
            f"{choices[0]}..{choices[-1]} bits, so the minimum average is {choices[0]}"
        )
    weights, acts = _block_points(qmodel)
    groups = [({n: q for n, q, _ in weights}, {n: c for n, _, c in weights}, weight_budget)]
    if act_budget is not None:
        groups.append(({n: q for n, q in acts}, {n: 1 for n, _ in acts}, act_budget))
    with torch.inference_mode():
        for quantizers, sizes, budget in groups:
            costs: dict[str, dict[int, float]] = {}
            for name, q in quantizers.items():
                start = q.bits
                costs[name] = {}
                for b in choices:
                    q.set_bits(b)
                    costs[name][b] = evaluate()
                q.set_bits(start)
            current = {n: q.bits for n, q in quantizers.items()}
            _greedy(list(quantizers), costs, sizes, current, choices, budget)
            for n, q in quantizers.items():
                q.set_bits(current[n])
    return summarize(qmodel, profile)


def allocate_bits(
    bits: BitsSpec,
    fp_model: nn.Module,
    qmodel: nn.Module,
    images: torch.Tensor,
    cfg: SearchConfig,
    profile: TargetProfile,
    budget_mb: float | None = None,
) -> dict:
    """Allocate a mixed ``bits`` spec (and/or a size budget) on calibrated ``qmodel``.

    Returns the allocation with the budget it met, as the report records it.
    """
    from clamp_export.search.driver import model_evaluator

    w_budget = bits.mp_weight
    if budget_mb is not None:
        w_budget = min(w_budget, budget_to_weight_bits(qmodel, budget_mb, profile))
    evaluate = model_evaluator(cfg, fp_model, qmodel, images)
    mixed = asdict(allocate(qmodel, evaluate, profile, w_budget, bits.mp_act))
    mixed["budget"] = {"avg_weight_bits": w_budget, "avg_act_bits": bits.mp_act, "mb": budget_mb}
    return mixed


def summarize(qmodel: nn.Module, profile: TargetProfile) -> Allocation:
    weights, acts = _block_points(qmodel)
    n = sum(c for _, _, c in weights)
    return Allocation(
        weight_bits={name: q.bits for name, q, _ in weights},
        act_bits={name: q.bits for name, q in acts},
        avg_weight_bits=sum(q.bits * c for _, q, c in weights) / n,
        avg_act_bits=sum(q.bits for _, q in acts) / len(acts),
        packed_mb=packed_mb(qmodel, profile.float_dtype),
    )
