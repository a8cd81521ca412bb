"""Stage 1 losses, as plain functions of tensors (no modules, no hooks).

- ``patch_infonce``: CLAMP-ViT's patch-level contrastive loss (DESIGN §6). For each anchor patch,
  the ``top_k`` most similar of its spatial neighbours are positives; every other patch of the
  same image (the remaining neighbours included) is a negative.
- ``patch_similarity_entropy``: PSAQ-ViT v1's prior, the differential entropy of the pairwise
  patch-similarity distribution estimated with a Gaussian kernel density.
- ``total_variation``: the smoothness prior both generators share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbour_index(grid: tuple[int, int], size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """For each patch of an H×W grid, the flat indices of its size×size neighbours (itself
    excluded) and a validity mask (False where the window leaves the grid). Shapes [N, size²-1]."""
    h, w = grid
    r = size // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    dy = torch.tensor([o[0] for o in offsets]).view(1, -1)
    dx = torch.tensor([o[1] for o in offsets]).view(1, -1)
    ny, nx = ys + dy, xs + dx
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    index = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)
    return index, valid


def select_positives(
    sim: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives: the ``top_k`` most similar valid neighbours of each anchor.

    ``sim`` is [B, N, N]. Returns (positive indices [B, N, k], mask [B, N, k]); an anchor on a
    corner with fewer valid neighbours than k keeps only those it has.
    """
    b, n, _ = sim.shape
    neigh_sim = sim.gather(2, index.unsqueeze(0).expand(b, -1, -1))
    neigh_sim = neigh_sim.masked_fill(~valid.unsqueeze(0), float("-inf"))
    k = min(top_k, index.shape[1])
    top, pos = neigh_sim.topk(k, dim=2)
    return index[torch.arange(n).view(1, n, 1), pos], torch.isfinite(top)


def patch_infonce(
    feats: torch.Tensor, grid: tuple[int, int], tau: float = 0.2, top_k: int = 4, size: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over anchors of one feature map [B, N, D] laid out on ``grid``.

    Returns (loss, mean anchor–positive cosine similarity). Positive selection is not
    differentiated (it is an index choice); the similarities are.
    """
    z = F.normalize(feats.float(), dim=-1)
    sim = z @ z.transpose(1, 2)  # [B, N, N]
    b, n, _ = sim.shape
    index, valid = neighbour_index(grid, size)
    index, valid = index.to(sim.device), valid.to(sim.device)
    with torch.no_grad():
        pos_idx, pos_mask = select_positives(sim, index, valid, top_k)
    logits = sim / tau
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    is_pos = torch.zeros(b, n, n, dtype=torch.bool, device=sim.device)
    is_pos.scatter_(2, pos_idx, pos_mask)
    neg_logits = logits.masked_fill(is_pos | eye, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=2, keepdim=True)  # [B, N, 1]
    pos_logits = logits.gather(2, pos_idx)  # [B, N, k]
    # -log(e^p / (e^p + Σ e^neg)) for each positive
    per_pos = torch.logaddexp(pos_logits, neg_lse.expand_as(pos_logits)) - pos_logits
    mask = pos_mask.float()
    loss = (per_pos * mask).sum() / mask.sum()
    pos_sim = (sim.gather(2, pos_idx) * mask).sum() / mask.sum()
    return loss, pos_sim.detach()


def patch_similarity_entropy(
    feats: torch.Tensor,
    bandwidth: float = 0.05,
    bins: int = 200,
    max_pairs: int = 4096,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PSAQ-ViT v1: differential entropy of the patch cosine similarities, per image, averaged.

    Density by a Gaussian KDE over a subsample of the pairwise similarities, integrated on a grid
    over [-1, 1]. Higher entropy = more diverse patch relations, which PSAQ-ViT maximizes.
    """
    z = F.normalize(feats.float(), dim=-1)
    sim = z @ z.transpose(1, 2)
    b, n, _ = sim.shape
    iu = torch.triu_indices(n, n, offset=1, device=sim.device)
    pairs = sim[:, iu[0], iu[1]]  # [B, P]
    if pairs.shape[1] > max_pairs:
        pick = torch.randperm(pairs.shape[1], generator=generator)[:max_pairs].to(sim.device)
        pairs = pairs[:, pick]
    grid = torch.linspace(-1, 1, bins, device=sim.device)
    dens = torch.exp(-0.5 * ((grid.view(1, -1, 1) - pairs.unsqueeze(1)) / bandwidth) ** 2)
    dens = dens.mean(2) / (bandwidth * (2 * torch.pi) ** 0.5)  # [B, bins]
    step = 2.0 / (bins - 1)
    entropy = -(dens * torch.log(dens + 1e-8)).sum(1) * step
    return entropy.mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()
