"""INT4 weight-only (w4a16 on trt) through the product path, against round-to-nearest.

For each block size and seed, runs the default pipeline (``clamp-export fmnist_vit --bits w4a16
--target trt --block-size B --eval-data fmnist``: Stage 1, the search of the block scales, the
scale refinement) and the round-to-nearest baseline (``--calib noise``: min-max block scales,
which for weights alone need no data). Reports top-1 of FP32, fake-quant and ORT on the exported
FP16 graph over the 10k test set, ORT/fake-quant agreement and the pipeline's time.

    .venv/bin/python benchmarks/weight_only.py [--blocks 64,128] [--seeds 0,1,2]

Prints a table and writes benchmarks/results/weight_only.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from clamp_export import atomic  # noqa: E402
from clamp_export.pipeline import RunConfig, run  # noqa: E402
from clamp_export.report.stage import ReportOptions  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _cell(model: str, calib: str, block: int, seed: int, tmp: str) -> dict:
    cfg = RunConfig(
        model=model,
        bits="w4a16",
        target="trt",
        calib=calib,
        block_size=block,
        eval_data="fmnist",
        out=f"{tmp}/{calib}-{block}-{seed}",
        seed=seed,
        cache_dir=f"{tmp}/cache",
        build_engine=False,  # accuracy and ORT parity; engines are the trt tests' and gpu_check's
        report=ReportOptions(backends=("torch-fp32", "ort-qdq"), asked=True, batches=(8,)),
    )
    r = run(cfg, log=lambda m: print(f"  {m}", flush=True))
    b = r["backends"]
    return {
        "calib": calib,
        "block": block,
        "seed": seed,
        "fp32": b["torch-fp32"]["top1"],
        "fakequant": b["torch-fakequant"]["top1"],
        "ort": b["ort-qdq"]["top1"],
        "agreement": b["ort-qdq"]["agreement"],
        "seconds": r["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=RESULTS / "weight_only.json")
    args = ap.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for block in map(int, args.blocks.split(",")):
            cells.append(_cell(args.model, "noise", block, 0, tmp))  # RTN: no seed dependence
            for seed in map(int, args.seeds.split(",")):
                cells.append(_cell(args.model, "clamp", block, seed, tmp))
    rows = []
    for calib, block in dict.fromkeys((c["calib"], c["block"]) for c in cells):
        group = [c for c in cells if (c["calib"], c["block"]) == (calib, block)]

        def pct(key: str, group=group) -> str:
            vals = [100 * c[key] for c in group]
            sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            return f"{statistics.fmean(vals):.2f}{sd}"

        drop = statistics.fmean(100 * (c["fp32"] - c["ort"]) for c in group)
        name = "round-to-nearest (min-max)" if calib == "noise" else "CLAMP default"
        rows.append(
            [
                name,
                str(block),
                str(len(group)),
                pct("fp32"),
                pct("fakequant"),
                pct("ort"),
                f"{drop:+.2f}",
                pct("agreement"),
                f"{statistics.fmean(c['seconds'] for c in group):.0f}",
            ]
        )
    print(f"\n{args.model} w4a16 on trt, 10k test images")
    print_table(
        [
            "method",
            "block",
            "runs",
            "fp32 %",
            "fake-quant %",
            "ORT %",
            "ORT drop pt",
            "agree ORT/FQ %",
            "s",
        ],
        rows,
    )
    atomic.write_json(args.out, {"cells": cells, "versions": versions()})


if __name__ == "__main__":
    main()
