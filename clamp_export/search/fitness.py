"""Stage 2 fitness L_F = L_C2 + L_O (DESIGN §6), as functions of tensors.

L_C2 is a local contrastive loss between the quantized and float outputs of a block: for each
patch position, the same sample's float feature is the positive and the other samples' are
negatives. L_O is the mean absolute error of the final outputs.

*(ours)* The model's fitness is F = mean over blocks of L_C2 + L_O. A layer in block b cannot
change blocks before b, so its search scores only the terms from block b on: minimizing that is
minimizing F exactly, and F never rises across layers and passes on fixed data. The paper scores
the layer's own block alone, which lets one layer undo another's gains downstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_contrastive(q_out: torch.Tensor, fp_out: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over the batch at each token: q_out, fp_out are [B, N, D] (or [B, D])."""
    if q_out.dim() == 2:
        q_out, fp_out = q_out.unsqueeze(1), fp_out.unsqueeze(1)
    q = F.normalize(q_out.float(), dim=-1)
    f = F.normalize(fp_out.float(), dim=-1)
    logits = torch.einsum("bnd,cnd->nbc", q, f) / tau  # [N, B, B]
    n, b, _ = logits.shape
    target = torch.arange(b, device=logits.device).repeat(n)
    return F.cross_entropy(logits.reshape(n * b, b), target)


def output_error(q_logits: torch.Tensor, fp_logits: torch.Tensor) -> torch.Tensor:
    return (q_logits.float() - fp_logits.float()).abs().mean()


def fitness(
    q_outs: list[torch.Tensor],
    fp_outs: list[torch.Tensor],
    q_logits: torch.Tensor,
    fp_logits: torch.Tensor,
    depth: int,
    tau: float,
    w_contrastive: float = 1.0,
    w_output: float = 1.0,
    mode: str = "both",
) -> float:
    """The part of F that the searched layer can change: blocks ``q_outs`` (its block onward)."""
    total = 0.0
    if mode in ("both", "contrastive") and q_outs:
        lc2 = sum(float(local_contrastive(q, f, tau)) for q, f in zip(q_outs, fp_outs, strict=True))
        total += w_contrastive * lc2 / depth
    if mode in ("both", "output"):
        total += w_output * float(output_error(q_logits, fp_logits))
    return total
