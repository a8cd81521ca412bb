"""Stage 1: optimize a batch of images against the frozen float model (DESIGN §6).

The model is wrapped by the fake-quant wrapper with every quantizer off, which is the float model
computed the same way, and whose attention modules report the head-averaged ``attn @ v`` through
``on_output``: that is where the patch losses look.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess
from clamp_export.progress import bar as progress_bar
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.fakequant import QuantAttention, set_mode, wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.synth.config import SynthConfig
from clamp_export.synth.losses import patch_infonce, patch_similarity_entropy, total_variation

# Memory of one optimization step grows with images × tokens × width × depth; refuse batches
# that would not fit rather than swap the machine to death.
MAX_BYTES_PER_STEP = 8 << 30
MAX_IMAGES = 10_000


@dataclass
class SynthResult:
    images: torch.Tensor  # normalized [N, C, H, W]
    targets: torch.Tensor  # [N]
    config: SynthConfig
    loss_curve: list[dict] = field(default_factory=list)
    misprediction_rate: float | None = None
    seconds: float = 0.0
    cached: bool = False


class AttentionTap:
    """Collects each block's head-averaged attention output with prefix tokens dropped."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        self.model = model
        self.attn = [m for m in model.modules() if isinstance(m, QuantAttention)]
        if not self.attn:
            raise UserError(
                f"{name} exposes no attention output: no timm Attention module (qkv → attn @ v) was "
                "found in its blocks"
            )
        self.prefix = getattr(
            model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0
        )
        self.grid = tuple(model.patch_embed.grid_size)
        self.outputs: list[torch.Tensor] = []
        for a in self.attn:
            a.on_output = self._record

    def _record(self, x: torch.Tensor) -> None:  # x: [B, heads, N, head_dim]
        self.outputs.append(x.mean(1)[:, self.prefix :, :])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.outputs = []
        logits = self.model(x)
        return logits, self.outputs

    def close(self) -> None:
        for a in self.attn:
            a.on_output = None


def float_tap(model: nn.Module, name: str) -> AttentionTap:
    """A float copy of ``model`` whose attention outputs can be read."""
    try:
        wrapped = wrap_model(model, BitsSpec(8, 8), get_profile("trt"))
    except UserError as e:
        raise UserError(f"{name} exposes no attention output: {e}") from None
    set_mode(wrapped, "off")
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return AttentionTap(wrapped, name)


def check_memory(
    model: nn.Module, pre: Preprocess, n: int, optimize: bool, flag: str = "--n"
) -> None:
    """Refuse, before any work, an image count that is absurd or would not fit in memory."""
    if n > MAX_IMAGES:
        raise UserError(
            f"{flag} {n} is more than clamp-export calibrates on (at most {MAX_IMAGES}; CLAMP uses 32)"
        )
    per_image = 4 * math.prod(pre.input_size)
    if optimize:
        tokens = math.prod(model.patch_embed.grid_size) + getattr(model, "num_prefix_tokens", 1)
        heads = max(getattr(b.attn, "num_heads", 1) for b in model.blocks)
        # activations kept for backward: ~12 width-sized tensors + 3 attention maps per block
        per_image += len(model.blocks) * (12 * tokens * model.embed_dim + 3 * heads * tokens**2) * 4
    limit = max(1, MAX_BYTES_PER_STEP // per_image)
    if n > limit:
        raise UserError(
            f"{flag} {n} is too large for memory: about {per_image * n / 2**30:.1f} GiB per step; at "
            f"most {limit} images for this model"
        )


def _jitter(x: torch.Tensor, cfg: SynthConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.jitter:
        dy, dx = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if cfg.flip and torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    return x


def generate(
    model: nn.Module, pre: Preprocess, cfg: SynthConfig, name: str = "model", progress: bool = True
) -> SynthResult:
    """Synthetic calibration images for ``model`` (float, frozen) under ``cfg``."""
    t0 = time.time()
    optimize = cfg.method != "noise" and cfg.steps > 0
    tap = float_tap(model, name) if optimize else None
    check_memory(model, pre, cfg.n, optimize)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # on the CPU: same images on any device
    device = next(model.parameters()).device
    targets = torch.randint(0, model.num_classes, (cfg.n,), generator=gen).to(device)
    lo, hi = (b.to(device) for b in pre.pixel_bounds())
    # every method starts from the noise baseline's images: Gaussian, clamped to valid pixels
    x = torch.max(torch.min(noise_images(cfg.n, pre, cfg.seed).to(device), hi), lo)
    result = SynthResult(images=x, targets=targets, config=cfg)
    if tap is None:
        result.seconds = time.time() - t0
        return _finish(result, model)
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    bar = progress_bar(
        range(cfg.steps), desc=f"synth {cfg.method}", disable=not progress, leave=False
    )
    try:
        for step in bar:
            logits, feats = tap(_jitter(x, cfg, gen))
            if cfg.method == "clamp":
                parts = [
                    patch_infonce(f, tap.grid, cfg.tau, cfg.top_k, cfg.neighbourhood) for f in feats
                ]
                l_patch = torch.stack([p[0] for p in parts]).mean()
                pos_sim = float(torch.stack([p[1] for p in parts]).mean())
            else:
                l_patch = -torch.stack(
                    [patch_similarity_entropy(f, cfg.kde_bandwidth, generator=gen) for f in feats]
                ).mean()
                pos_sim = None
            l_ce = F.cross_entropy(logits, targets)
            l_tv = total_variation(x)
            loss = cfg.w_patch * l_patch + cfg.w_ce * l_ce + cfg.w_tv * l_tv
            if not torch.isfinite(loss):
                raise UserError(
                    f"synthesis diverged: loss became {loss.item()} at step {step}; try a lower "
                    "--lr (nothing was written)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x.data, hi), lo)
            rec = {
                "step": step,
                "loss": loss.item(),
                "patch": l_patch.item(),
                "ce": l_ce.item(),
                "tv": l_tv.item(),
            }
            if pos_sim is not None:
                rec["pos_sim"] = pos_sim
            result.loss_curve.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", patch=f"{rec['patch']:.3f}", refresh=False)
    finally:
        tap.close()
        bar.close()
    result.images = x.detach()
    result.seconds = time.time() - t0
    return _finish(result, model)


@torch.no_grad()
def _finish(result: SynthResult, model: nn.Module) -> SynthResult:
    model.eval()
    pred = torch.cat([model(x).argmax(1) for x in result.images.split(256)])
    result.misprediction_rate = float((pred != result.targets).float().mean())
    # on the CPU, as a set read from the cache is: callers move it where they compute
    result.images, result.targets = result.images.cpu(), result.targets.cpu()
    return result
