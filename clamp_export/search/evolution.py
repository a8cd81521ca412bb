"""Layer-wise evolutionary search of quantization parameters (CLAMP-ViT Stage 2).

A layer's genome is the (scale, zero-point) of each of its quantizers. Each cycle evaluates a
population, keeps the best (elitism, so fitness on fixed data never rises), and breeds the next
population by tournament selection and multiplicative log-normal mutation. Zero-points move only
where the target allows them (asymmetric activations).
"""

from __future__ import annotations

import torch

from clamp_export.quant.fakequant import QuantAttention, Quantizer, _QuantWeighted, layer_points

Genome = list[tuple[torch.Tensor, torch.Tensor]]


def layer_quantizers(module) -> list[Quantizer]:
    """The layer's searched quant points: a twin-uniform softmax output keeps its data-free
    levels (its range is [0, 1]), and float points (w4a16's activations) are none."""
    if not isinstance(module, (_QuantWeighted, QuantAttention)):
        raise TypeError(f"not a searchable layer: {type(module).__name__}")
    return [q for _, q in layer_points(module) if not q.twin]


def read_genome(quantizers: list[Quantizer]) -> Genome:
    return [(q.scale.clone(), q.zero_point.clone()) for q in quantizers]


def install(quantizers: list[Quantizer], genome: Genome) -> None:
    for q, (s, z) in zip(quantizers, genome, strict=True):
        q.set_params(s, z)  # applies the target's storage rounding (FP16 scales on trt)


def mutate(
    genome: Genome, quantizers: list[Quantizer], sigma: float, zp_rate: float, gen: torch.Generator
) -> Genome:
    out = []
    for (s, z), q in zip(genome, quantizers, strict=True):
        # draws on the CPU generator, so a seed means the same mutations on any device
        s2 = s * torch.exp(sigma * torch.randn(s.shape, generator=gen)).to(s.device)
        z2 = z
        if not q.symmetric:
            move = (torch.rand(z.shape, generator=gen) < zp_rate).to(z.device, z.dtype)
            sign = torch.where(torch.rand(z.shape, generator=gen) < 0.5, -1, 1).to(
                z.device, z.dtype
            )
            z2 = torch.clamp(z + move * sign, q.qmin, q.qmax)
        out.append((s2, z2))
    return out


def tournament(fits: list[float], k: int, gen: torch.Generator) -> int:
    pick = torch.randint(0, len(fits), (min(k, len(fits)),), generator=gen).tolist()
    return min(pick, key=lambda i: fits[i])


def scan_scales(
    quantizers: list[Quantizer], evaluate, multipliers: tuple[float, ...], best_fit: float
) -> float:
    """Coarse scan of each activation scale, one quantizer at a time, keeping what improves.

    *(ours)* Multiplicative mutation moves a scale a few percent per cycle, so it cannot reach a
    range several times narrower than min-max. At 4 bits that is where the optimum often lies (the
    softmax output's fixed [0, 1] range puts most probabilities in its lowest level). Weights are
    left to the evolution: their min-max ranges are already close.
    """
    best = read_genome(quantizers)
    for i, q in enumerate(quantizers):
        if q.is_weight:
            continue
        base_scale, zp = best[i]
        for m in multipliers:
            cand = [*best[:i], (base_scale * m, zp), *best[i + 1 :]]
            install(quantizers, cand)
            fit = evaluate()
            if fit < best_fit:
                best, best_fit = cand, fit
    install(quantizers, best)
    return best_fit


def try_proposal(quantizers: list[Quantizer], evaluate, propose, best_fit: float) -> float:
    """Let ``propose()`` install parameters; keep them only if they lower the fitness."""
    before = read_genome(quantizers)
    propose()
    fit = evaluate()
    if fit < best_fit:
        return fit
    install(quantizers, before)
    return best_fit


def evolve_layer(
    quantizers: list[Quantizer],
    evaluate,
    cycles: int,
    population: int,
    tournament_size: int,
    sigma: float,
    zp_rate: float,
    gen: torch.Generator,
    on_cycle=None,
    scan: tuple[float, ...] = (),
    propose=None,
) -> tuple[float, float]:
    """Search one layer in place. ``evaluate()`` scores the currently installed parameters.

    ``on_cycle(cycle)`` may change the data (cyclic adaptation); it returns True when it did, and
    the incumbent is then re-scored. ``scan`` multipliers are tried first (see scan_scales), then
    ``propose()``, which installs other parameters that are kept only if the fitness falls.
    Returns (fitness before, fitness after) on the final data.
    """
    start_fit = evaluate()
    best_fit = scan_scales(quantizers, evaluate, scan, start_fit) if scan else start_fit
    if propose is not None:
        best_fit = try_proposal(quantizers, evaluate, propose, best_fit)
    best = read_genome(quantizers)
    pop = [best] + [mutate(best, quantizers, sigma, zp_rate, gen) for _ in range(population - 1)]
    fits = [best_fit] + [float("inf")] * (population - 1)
    for cycle in range(cycles):
        for i in range(1, len(pop)):
            install(quantizers, pop[i])
            fits[i] = evaluate()
        i_best = min(range(len(pop)), key=lambda i: fits[i])
        if fits[i_best] < best_fit:
            best, best_fit = pop[i_best], fits[i_best]
        install(quantizers, best)
        if on_cycle is not None and on_cycle(cycle):
            best_fit = evaluate()
            start_fit = float("nan")  # the data changed: the two numbers are not comparable
        parents = [pop[tournament(fits, tournament_size, gen)] for _ in range(population - 1)]
        pop = [best] + [mutate(p, quantizers, sigma, zp_rate, gen) for p in parents]
        fits = [best_fit] + [float("inf")] * (population - 1)
    install(quantizers, best)
    return start_fit, best_fit
