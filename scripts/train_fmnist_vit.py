"""Train a Fashion-MNIST reference model (``fmnist_vit``, ``fmnist_vit_reg4``; DESIGN §7).

Run once, not in CI. One cosine cycle per call; ``scripts/train_fmnist_vit.sh`` chains the three
cycles that made the shipped ``fmnist_vit``, ``scripts/train_fmnist_vit_reg4.sh`` the one of
``fmnist_vit_reg4``.
Writes clamp_export/models/reference/MODEL.safetensors and MODEL.json (seed, epochs, time, test
accuracy). The recipe is plain: AdamW, cosine with warm-up, label smoothing, random
crop (pad 2) + horizontal flip. Fused attention is used for training speed only: it changes no
parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import set_fused_attn

from clamp_export.data.fashion_mnist import load_fashion_mnist
from clamp_export.models import registry


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    idx = torch.arange(28)
    rows = (dy[:, None] + idx[None, :])[:, None, :, None].expand(n, 1, 28, 32)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + idx[None, :])[:, None, None, :].expand(n, 1, 28, 28)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        correct += (model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_vit", choices=registry.REFERENCE_MODELS)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=registry.REFERENCE_DIR)
    ap.add_argument("--init", type=Path, help="continue from these weights (a second cosine cycle)")
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--bench", action="store_true", help="time 20 steps and exit")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    spec = registry.ALIASES[args.model]
    model = registry.create(spec, pretrained=False)
    if args.init:
        from clamp_export.models.weights import load_weights

        load_weights(model, args.init)
    set_fused_attn(True)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    pre = spec.preprocess

    def prep(images: np.ndarray) -> torch.Tensor:
        return pre.normalize(torch.from_numpy(images).float().div(255).unsqueeze(1))

    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr, xte, yte = prep(xtr), torch.from_numpy(ytr), prep(xte), torch.from_numpy(yte)
    lo = float(pre.normalize(torch.zeros(1, 1, 1, 1)))

    steps_per_epoch = len(xtr) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(steps_per_epoch * args.warmup_epochs))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "token" in name or "pos_embed" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M, steps: {total}")
    t0 = time.time()
    history = []
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            xb = augment(xtr[idx] - lo, gen) + lo  # pad with the normalized value of black
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if args.bench and step == 20:
                print(f"{(time.time() - t0) / 20 * 1000:.0f} ms/step")
                return
        acc = evaluate(model, xte, yte)
        history.append({"epoch": epoch + 1, "test_top1": acc, "minutes": (time.time() - t0) / 60})
        print(history[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"{args.model}.safetensors"))
    record = {
        "command": f"python scripts/train_fmnist_vit.py --model {args.model} "
        + f"--epochs {args.epochs} --batch {args.batch} --lr {args.lr} --seed {args.seed}"
        + (f" --init {args.init} --warmup-epochs {args.warmup_epochs}" if args.init else ""),
        "timm_name": spec.timm_name,
        "kwargs": spec.kwargs,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_minutes": round((time.time() - t0) / 60, 1),
        "test_top1": history[-1]["test_top1"],
        "history": history,
        "torch": torch.__version__,
    }
    if args.init and args.init.with_suffix(".json").is_file():  # chain the earlier run's record
        record["init_record"] = json.loads(args.init.with_suffix(".json").read_text())
    (args.out / f"{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
