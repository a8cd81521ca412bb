"""Deployed-graph parity on the full Fashion-MNIST test set, through the product path.

Runs ``clamp-export fmnist_vit --bits B --target T --eval-data fmnist`` (full CLAMP-ViT by default)
for each combination and tabulates ORT-vs-fake-quant agreement, logit error, accuracy and the
pipeline's wall time.

    .venv/bin/python benchmarks/parity.py [--bits w8a8,w4a8] [--targets ort,trt] [--calib clamp]

Prints a table and writes benchmarks/results/parity.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from clamp_export import atomic  # noqa: E402
from clamp_export.pipeline import RunConfig, run  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--bits", default="w8a8,w4a8")
    ap.add_argument("--targets", default="ort,trt")
    ap.add_argument("--calib", default="clamp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "parity.json")
    args = ap.parse_args()
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            for bits in args.bits.split(","):
                cfg = RunConfig(
                    model=args.model,
                    bits=bits,
                    target=target,
                    calib=args.calib,
                    eval_data="fmnist",
                    out=f"{tmp}/{target}-{bits}",
                    seed=args.seed,
                    cache_dir=f"{tmp}/cache",
                )
                reports[f"{target}|{bits}"] = run(cfg, log=lambda m: print(f"  {m}", flush=True))
    rows = []
    for key, r in reports.items():
        target, bits = key.split("|")
        b = r["backends"]
        err = b["ort-qdq"]["logit_error"]
        rows.append(
            [
                target,
                bits,
                f"{100 * b['torch-fp32']['top1']:.2f}",
                f"{100 * b['torch-fakequant']['top1']:.2f}",
                f"{100 * b['ort-qdq']['top1']:.2f}",
                f"{100 * b['ort-qdq']['agreement']:.2f}",
                f"{err['mean_abs']:.4f}",
                f"{err['cosine']:.6f}",
                f"{r['seconds']:.0f}",
            ]
        )
    print(
        f"\n{args.model}, --calib {args.calib}, {reports[next(iter(reports))]['parity_inputs']['count']} test images"
    )
    print_table(
        [
            "target",
            "bits",
            "fp32 %",
            "fake-quant %",
            "ORT %",
            "agree ORT/FQ %",
            "mean|Δ|",
            "cosine",
            "seconds",
        ],
        rows,
    )
    atomic.write_json(args.out, {"calib": args.calib, "reports": reports, "versions": versions()})


if __name__ == "__main__":
    main()
