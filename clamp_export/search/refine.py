"""*(ours)* Scale refinement: after the layer-wise search, every scale at once, by gradient.

The evolutionary search tunes one layer at a time against the float model's block outputs, so it
cannot see how the errors of many 4-bit activations add up at the logits. This last step trains
every scale jointly (LSQ gradients, ``quant.math.fake_quantize_learned``) to match the float
logits on the same Stage 1 images, so it stays data-free.

32 images are few: without augmentation, more than about 100 steps fit them and lose on the test
set again. So every step moves each image by a few pixels (border pixels repeated) and asks the
float model again; any input is a valid distillation input. Horizontal flips and mixup did not
help on fmnist_vit (README).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from clamp_export.errors import UserError
from clamp_export.progress import bar as progress_bar
from clamp_export.quant.fakequant import learnable_scales
from clamp_export.search.config import SearchConfig

# Activation elements of one backward pass's widest tensors (see ``images_per_backward``):
# DeiT-S at 224 px then takes 7 images per backward, fmnist_vit all 32 at once.
BACKWARD_ELEMENTS = 4_000_000


def _kl(q_logits: torch.Tensor, fp_probs: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(q_logits, dim=-1), fp_probs, reduction="batchmean")


def logprob_mse(q_logits: torch.Tensor, fp_probs: torch.Tensor) -> torch.Tensor:
    """Squared error of every class's log-probability, summed over classes, mean over images.

    KL weighs each class by its float probability, so on 32 images it hardly sees the unlikely
    classes; here each class counts alike, so the ranking below the top class is matched too.
    """
    log_fp = fp_probs.clamp_min(1e-30).log()  # a probability that underflowed to 0
    return ((F.log_softmax(q_logits, dim=-1) - log_fp) ** 2).sum(-1).mean()


# SearchConfig.refine_loss -> the loss; config.REFINE_LOSSES lists the same names
DISTILLATION_LOSSES = {"kl": _kl, "logprob_mse": logprob_mse}


def distillation_loss(q_logits: torch.Tensor, fp_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """The refinement's loss ``kind`` (``SearchConfig.refine_loss``) against the float model."""
    return DISTILLATION_LOSSES[kind](q_logits, fp_probs)


@contextmanager
def block_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Every forward pass inside appends each block's output, in order, to the yielded list."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def feature_loss(q_feats: list[torch.Tensor], fp_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of each block output's squared error relative to its float energy: the
    logits of 32 images say little about where inside a deep model the error starts."""
    terms = [((q - f) ** 2).mean() / (f**2).mean() for q, f in zip(q_feats, fp_feats, strict=True)]
    return torch.stack(terms).mean()


def _blocks_if(on: bool, model: nn.Module):
    """``block_outputs`` where the feature term is on; elsewhere no hooks, an empty list."""
    return block_outputs(model) if on else nullcontext([])


def images_per_backward(qmodel: nn.Module) -> int:
    """How many images one backward pass may hold, so peak memory stays bounded on large models.

    Every quantizer of the learned-scale graph keeps a few activation-sized tensors for the
    backward pass: DeiT-S at 224 px with all 32 images peaked at 14 GiB. Per image the widest
    tensors are the MLP hidden state (tokens x hidden) and the attention (heads x tokens^2).
    """
    blk = qmodel.blocks[0]
    tokens = qmodel.patch_embed.num_patches + getattr(qmodel, "num_prefix_tokens", 1)
    per_image = tokens * (blk.mlp.fc1.weight.shape[0] + blk.attn.num_heads * tokens)
    return max(1, BACKWARD_ELEMENTS // per_image)


def shifted(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels along each axis, its border repeated."""
    if max_shift == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=gen).tolist()
    return torch.stack(
        [p[:, i : i + h, j : j + w] for p, (i, j) in zip(padded, offsets, strict=True)]
    )


def flipped(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image mirrored left to right with probability 1/2, as the reference models' training
    augmentation does beside its shifts: more distinct views of few calibration images."""
    mirror = torch.rand(len(images), generator=gen) < 0.5
    return torch.where(mirror[:, None, None, None], images.flip(-1), images)


def shift_pixels(images: torch.Tensor, fraction: float) -> int:
    """The largest shift for ``fraction`` of the image side: 2 px at 28 px for 0.07, 16 at 224."""
    return max(1, round(fraction * images.shape[-1])) if fraction > 0 else 0


def refine_scales(
    fp_model: nn.Module,
    qmodel: nn.Module,
    images: torch.Tensor,
    cfg: SearchConfig,
    progress: bool = True,
) -> dict:
    """Adam on every log-scale of ``qmodel`` (in place) for KL(FP || Q), or the loss that
    ``cfg.refine_loss`` names, on shifted (with ``cfg.refine_flip`` also mirrored) ``images``;
    plus ``cfg.refine_features`` times ``feature_loss`` on the block outputs where it is set.

    ``cfg.refine_steps`` steps at ``cfg.refine_lr``; ``cfg.refine_shift`` is the largest shift as
    a fraction of the image side (0: the images as they are), the shifts drawn from ``cfg.seed``.
    Full batch (its gradient summed over ``images_per_backward`` chunks where the model is
    large) and seeded shifts, so a run is deterministic. Returns the record for
    ``search.json``: the KL (and the feature loss, where it is on) on the unshifted images before
    and after (KL whatever the loss, so records compare), and the time.
    """
    t0 = time.time()
    features = cfg.refine_features > 0
    with torch.no_grad():
        with _blocks_if(features, fp_model) as fp_unshifted:
            fp_probs = F.softmax(fp_model(images), dim=-1)

        def losses(stage: str) -> dict:
            with _blocks_if(features, qmodel) as q_feats:
                out = {f"kl_{stage}": float(_kl(qmodel(images), fp_probs))}
            if features:
                out[f"features_{stage}"] = float(feature_loss(q_feats, fp_unshifted))
            return out

        before = losses("before")
    gen = torch.Generator().manual_seed(cfg.seed)
    max_shift = shift_pixels(images, cfg.refine_shift)
    frozen = [p for p in qmodel.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), learnable_scales(qmodel) as log_scales:
            opt = torch.optim.Adam(log_scales, lr=cfg.refine_lr)
            chunk = images_per_backward(qmodel)
            batch, targets = images, fp_probs
            fp_feats = [f.split(chunk) for f in fp_unshifted]
            for _ in progress_bar(
                range(cfg.refine_steps), desc="refine scales", disable=not progress, leave=False
            ):
                opt.zero_grad(set_to_none=True)
                if max_shift or cfg.refine_flip:
                    batch = shifted(images, max_shift, gen)
                    if cfg.refine_flip:
                        batch = flipped(batch, gen)
                    with torch.no_grad(), _blocks_if(features, fp_model) as outs:
                        targets = F.softmax(fp_model(batch), dim=-1)
                    fp_feats = [f.split(chunk) for f in outs]
                parts = list(zip(batch.split(chunk), targets.split(chunk), strict=True))
                for i, (x, p) in enumerate(parts):
                    with _blocks_if(features, qmodel) as q_feats:
                        loss = distillation_loss(qmodel(x), p, cfg.refine_loss)
                    if features:
                        fp_part = [f[i] for f in fp_feats]
                        loss = loss + cfg.refine_features * feature_loss(q_feats, fp_part)
                    if len(parts) > 1:  # the full batch's mean, one chunk at a time
                        loss = loss * (len(x) / len(images))
                    if not torch.isfinite(loss):
                        raise UserError(
                            "scale refinement diverged; lower refine_lr or set refine_steps=0"
                        )
                    loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        after = losses("after")
    return {
        "steps": cfg.refine_steps,
        **before,
        **after,
        "seconds": time.time() - t0,
    }
