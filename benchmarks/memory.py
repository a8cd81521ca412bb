"""Peak memory of the full pipeline (Stage 1 + Stage 2 + export + parity) on a large model.

Runs ``clamp-export MODEL --random-weights`` under ``/usr/bin/time -v`` and reports its maximum
resident set size and wall time. Peak memory is set by the batch (32 images), the model and the
search's caches (one float output per block, one quantized stage input), not by how many steps or
cycles run, so ``--synth-steps`` and the small search below keep a CPU run to minutes. Stage 1's
default-preset time is extrapolated from the measured time per step.

    .venv/bin/python benchmarks/memory.py [--model deit_s] [--synth-steps 8]

Prints a table and writes benchmarks/results/memory_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from clamp_export import atomic
from clamp_export.pipeline import versions
from clamp_export.search import preset as search_preset
from clamp_export.synth import preset as synth_preset

RESULTS = Path(__file__).resolve().parent / "results"
# one candidate and one image refinement per layer: every cache and the refinement's backward
# pass are exercised at full size, in a fraction of the default preset's time
SMALL_SEARCH = {"passes": 1, "cycles": 1, "population": 2, "refresh_steps": 1, "scan": ()}


def _child(args: argparse.Namespace) -> None:
    from clamp_export.pipeline import RunConfig, run

    cfg = RunConfig(
        model=args.model,
        bits=args.bits,
        target=args.target,
        random_init=True,
        synth_overrides={"steps": args.synth_steps},
        search_overrides=SMALL_SEARCH,
        cache_dir=None,
        out=args.out_dir,
        build_engine=False,
    )
    run(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="deit_s")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--synth-steps", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "/usr/bin/time",
            "-v",
            sys.executable,
            __file__,
            "--child",
            f"--model={args.model}",
            f"--bits={args.bits}",
            f"--target={args.target}",
            f"--synth-steps={args.synth_steps}",
            f"--out-dir={tmp}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"pipeline failed:\n{proc.stderr[-3000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
        wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", proc.stderr)[1]
        qp = json.loads((Path(tmp) / "qparams.json").read_text())
    wall_s = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    meta = qp["metadata"]
    synth_s, search_s = meta["calibration"]["synth"]["seconds"], meta["search"]["seconds"]
    small = search_preset("default", **SMALL_SEARCH)
    per_step = synth_s / args.synth_steps
    est = {"stage1_default_s": per_step * synth_preset("default").steps}
    rows = [
        ("peak RSS", f"{rss_kb / 2**20:.2f} GiB"),
        ("wall (measured run)", f"{wall_s:.0f} s"),
        ("Stage 1 per step (32 images)", f"{per_step:.2f} s"),
        ("Stage 1 default preset (estimate)", f"{est['stage1_default_s'] / 60:.1f} min"),
        ("Stage 2, 1 candidate + 1 refinement per layer", f"{search_s:.0f} s"),
    ]
    print(f"{args.model} {args.bits} {args.target}, random weights, CPU")
    for k, v in rows:
        print(f"  {k:36s} {v}")
    atomic.write_json(
        args.out or RESULTS / f"memory_{args.model}.json",
        {
            "model": args.model,
            "bits": args.bits,
            "target": args.target,
            "peak_rss_kb": rss_kb,
            "wall_s": wall_s,
            "synth_steps": args.synth_steps,
            "search": small.to_dict(),
            "stage1_seconds": synth_s,
            "stage2_seconds": search_s,
            "per_step_s": per_step,
            "estimates": est,
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
