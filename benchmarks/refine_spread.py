"""How much of a refined W4A4 number is luck? The scale refinement re-run on one searched model.

The scale refinement (Stage 2's last step) rounds every activation to 16 levels on its way to
the loss, so its path is chaotic: a change of its float teacher's logits by float rounding
(1e-6, ``Perturbed``) ends in scales that score a few tenths apart on the test set. One
accuracy.py cell is one draw of that. For each (seed, target) this searches once (the default,
``refine_steps=0``), then refines ``--runs`` times: run 0 unperturbed (it reproduces the
default cell of accuracy.py), the others with perturbed teachers. It reports the runs' mean and
spread, the "soup" (the runs' log-scales averaged), and the same runs on 64 Stage 1 images
instead of 32: the cell's own set plus the next seed's committed set (seed 2 takes seed 0's),
to ask whether the refinement is short of images. The 64-image column is a what-if: the
pipeline refines on its own 32 images; ``--images 32`` leaves it out.

    .venv/bin/python benchmarks/refine_spread.py [--bits w4a4] [--targets ort,trt]
        [--seeds 0,1,2] [--runs 4] [--images 32,64]

Each (seed, target) is a cell of benchmarks/results/cells.jsonl (targets may run in parallel
processes; ``--cached-only`` tabulates them). Prints a table and writes
benchmarks/results/refine_spread.json.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Cells,
    base_parser,
    calibration_images,
    cell_key,
    fmt_pct,
    load_reference,
    mean_std,
    print_table,
    searchable_model,
    top1,
)

from clamp_export import atomic  # noqa: E402
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.fakequant import quantizers  # noqa: E402
from clamp_export.search import preset, run_search  # noqa: E402
from clamp_export.search.refine import refine_scales  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER_NOISE = 1e-6  # the size of float32 rounding on logits of about 4


class Perturbed(nn.Module):
    """The float teacher with its logits moved by ``TEACHER_NOISE`` (a fixed draw per run)."""

    def __init__(self, model: nn.Module, run: int) -> None:
        super().__init__()
        self.model, self.run = model, run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.run == 0:
            return out
        g = torch.Generator().manual_seed(self.run)
        return out + TEACHER_NOISE * torch.randn(out.shape, generator=g)


def _refined_scales(qm: nn.Module) -> list[torch.Tensor | None]:
    return [
        q.scale.clone() if q.mode == "quant" and not q.twin else None for *_, q in quantizers(qm)
    ]


def _soup(searched: nn.Module, runs: list[list[torch.Tensor | None]]) -> nn.Module:
    """The searched model with each scale the geometric mean of the runs' refined scales."""
    soup = copy.deepcopy(searched)
    for i, (*_, q) in enumerate(quantizers(soup)):
        if runs[0][i] is not None:
            log_mean = torch.stack([r[i].log() for r in runs]).mean(0)
            q.set_params(log_mean.exp(), q.zero_point)
    return soup


def spread(
    loaded, calib, extra, bits: str, target: str, cfg, runs: int, labels, x_test, y_test
) -> dict:
    """{searched, images: {32|64: {runs, soup, seconds}}} for one search refined ``runs`` times
    on each image count of ``labels``."""
    search_cfg = dataclasses.replace(cfg, refine_steps=0)
    fp, qm = searchable_model(loaded, bits, target, calib, "minmax", search_cfg)
    header = {"model": loaded.name, "target": target, "bits": bits}
    run_search(fp, qm, calib, search_cfg, header, loaded.preprocess.pixel_bounds(), progress=False)
    rec = {"searched": top1(qm, x_test, y_test), "images": {}}
    sets = {"32": lambda: calib, "64": lambda: torch.cat([calib, extra])}
    for label in labels:
        images, accs, scales, t = sets[label](), [], [], time.time()
        for r in range(runs):
            refined = copy.deepcopy(qm)
            refine_scales(Perturbed(fp, r), refined, images, cfg, progress=False)
            accs.append(top1(refined, x_test, y_test))
            scales.append(_refined_scales(refined))
            print(
                f"  {target} {bits} seed {cfg.seed} {label} images run {r}: {100 * accs[-1]:.2f}%",
                flush=True,
            )
        rec["images"][label] = {
            "runs": accs,
            "soup": top1(_soup(qm, scales), x_test, y_test),
            "seconds": time.time() - t,
        }
    return rec


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _summary(cell: dict, labels) -> tuple[float, ...]:
    """searched, then (mean of the runs, soup) for each image count."""
    means = [(mean_std(cell["images"][k]["runs"])[0], cell["images"][k]["soup"]) for k in labels]
    return (cell["searched"], *(v for pair in means for v in pair))


def main() -> None:
    ap = base_parser(__doc__, ("w4a4",), RESULTS / "refine_spread.json")
    ap.add_argument(
        "--runs", type=int, default=4, help="refinements per search (run 0 unperturbed)"
    )
    ap.add_argument("--images", default="32,64", choices=("32,64", "32"))
    args = ap.parse_args()
    labels = args.images.split(",")
    if args.n != 32:  # the cells are labelled by image count: own set 32, with the next seed's 64
        raise SystemExit("refine_spread.py compares 32 and 64 Stage 1 images: leave --n at 32")
    seeds = [int(s) for s in args.seeds.split(",")]
    loaded, x_test, y_test, fp32 = load_reference(args)
    cells = Cells(args.cells, args.fresh)
    rows = []
    for seed in seeds:
        images = extra = None
        extra_seed = (seed + 1) % 3  # the committed sets are seeds 0, 1 and 2
        for target in args.targets.split(","):
            for bits in args.bits.split(","):
                cfg = preset("default", BitsSpec.parse(bits), seed=seed)
                if not cfg.refine_steps:
                    raise SystemExit(f"the default preset does not refine at {bits}")
                key = {
                    **cell_key(
                        loaded, x_test, args, seed, "clamp", target, bits, "refine-spread", cfg
                    ),
                    "runs": args.runs,
                    "extra_seed": extra_seed,
                    **({} if "64" in labels else {"images": args.images}),
                }
                if args.cached_only and not cells.has(key):
                    continue
                if images is None:
                    images, _ = calibration_images(loaded, "clamp", args.n, seed, args.synth_preset)
                    extra, _ = calibration_images(
                        loaded, "clamp", args.n, extra_seed, args.synth_preset
                    )
                run = partial(
                    spread,
                    loaded,
                    images,
                    extra,
                    bits,
                    target,
                    cfg,
                    args.runs,
                    labels,
                    x_test,
                    y_test,
                )
                rows.append(
                    {"target": target, "bits": bits, "seed": seed, **cells.get_or_run(key, run)}
                )

    print(f"\ntop-1 % (FP32 {100 * fp32:.2f}); refined: mean ± std over the runs [run 0]")
    table = []
    for target in args.targets.split(","):
        for bits in args.bits.split(","):
            mine = [r for r in rows if r["target"] == target and r["bits"] == bits]
            for r in mine:
                own = r["images"]["32"]
                row = [target, bits, str(r["seed"]), f"{100 * r['searched']:.2f}"]
                row += [f"{fmt_pct(own['runs'])} [{100 * own['runs'][0]:.2f}]", _pct(own["soup"])]
                if "64" in labels:
                    more = r["images"]["64"]
                    row += [fmt_pct(more["runs"]), _pct(more["soup"])]
                table.append(row)
            if mine:  # the seeds' means
                cols = list(zip(*(_summary(r, labels) for r in mine), strict=True))
                table.append([target, bits, "mean"] + [_pct(sum(c) / len(c)) for c in cols])
    header = ["target", "bits", "seed", "searched"]
    for k in labels:
        header += [f"refined, {k} images", f"soup, {k}"]
    print_table(header, table)
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "eval_images": len(x_test),
            "fp32_top1": fp32,
            "runs_per_cell": args.runs,
            "teacher_noise": TEACHER_NOISE,
            "search": {
                b: preset("default", BitsSpec.parse(b)).to_dict() for b in args.bits.split(",")
            },
            "cells": rows,
            "versions": versions(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
