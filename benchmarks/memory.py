"""Peak memory of the full pipeline (Stage 1 + Stage 2 + export + parity) on a large model.

Runs the pipeline's stages on a randomly initialized model in a child process under
``/usr/bin/time -v`` and reports its maximum resident set size and wall time. Peak memory is set by
the batch (32 images), the model, the backward passes (Stage 1 steps, cyclic refinement) and the
search's caches (one float output per block, one quantized stage input), not by how many steps,
cycles or layers run. So ``--synth-steps`` and ``--layers`` (Stage 2 stopped after that many
layers, each with one candidate and one image refinement) keep a CPU run to minutes, while every
buffer is exercised at full size. Below 8-bit activations the search's scale refinement follows
for ``--refine-steps`` steps (its chunked backward passes at full size). Stage 1's default-preset
time is extrapolated per step.

    .venv/bin/python benchmarks/memory.py [--model deit_s] [--bits w8a8] [--synth-steps 4]

Prints a table and writes benchmarks/results/memory_<model>_<bits>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table

from clamp_export import atomic
from clamp_export.quant.bits import BitsSpec
from clamp_export.search import preset as search_preset
from clamp_export.synth import preset as synth_preset
from clamp_export.versions import versions

RESULTS = Path(__file__).resolve().parent / "results"
# one candidate and one image refinement per layer: every cache and the refinement's backward
# pass are exercised at full size, in a fraction of the default preset's time
SMALL_SEARCH = {"passes": 1, "cycles": 1, "population": 2, "refresh_steps": 1, "scan": ()}


def _child(args: argparse.Namespace) -> None:
    """The pipeline's stages in order, with Stage 2 stopped after ``--layers`` layers."""
    from clamp_export.export.qdq import export_qdq
    from clamp_export.models import load_model
    from clamp_export.quant.calibrate import calibrate
    from clamp_export.quant.fakequant import wrap_model
    from clamp_export.quant.targets import get_profile
    from clamp_export.report.parity import top1_agreement
    from clamp_export.runtime.runners import OrtRunner, TorchRunner
    from clamp_export.search import prepare_equalization, run_search
    from clamp_export.search.refine import refine_scales
    from clamp_export.synth import synthesize

    t = {}
    loaded = load_model(args.model, random_init=True)
    pre, profile = loaded.preprocess, get_profile(args.target)
    t0 = time.time()
    synth, _ = synthesize(
        loaded, synth_preset("default", steps=args.synth_steps), None, progress=False
    )
    t["stage1_s"] = time.time() - t0
    cfg = search_preset("default", BitsSpec.parse(args.bits), **SMALL_SEARCH)
    qm = wrap_model(loaded.model, BitsSpec.parse(args.bits), profile)
    fp = prepare_equalization(loaded.model, qm, synth.images, cfg)
    calibrate(qm, synth.images)
    t0 = time.time()
    header = {"model": args.model, "target": args.target, "bits": args.bits}
    run_search(
        fp,
        qm,
        synth.images,
        cfg,
        header,
        pre.pixel_bounds(),
        progress=False,
        stop_after=args.layers,
    )
    t["stage2_s"] = time.time() - t0
    if cfg.refine_steps:  # stop_after skips the refinement: run a few of its steps here
        t0 = time.time()
        steps_cfg = dataclasses.replace(cfg, refine_steps=args.refine_steps)
        refine_scales(fp, qm, synth.images, steps_cfg, progress=False)
        t["refine_s"] = time.time() - t0
    t0 = time.time()
    onnx_path = Path(args.out_dir) / "model.qdq.onnx"
    export_qdq(qm, pre.input_size, profile, onnx_path)
    x = synth.images
    agree = top1_agreement(OrtRunner(onnx_path)(x), TorchRunner(qm, "fq")(x))
    t["export_parity_s"] = time.time() - t0
    Path(args.out_dir, "times.json").write_text(json.dumps({**t, "agreement": agree}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="deit_s")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--synth-steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2, help="Stage 2 layers to run")
    ap.add_argument("--refine-steps", type=int, default=2, help="scale refinement steps (A < 8)")
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
            f"--layers={args.layers}",
            f"--refine-steps={args.refine_steps}",
            f"--out-dir={tmp}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"pipeline failed:\n{proc.stderr[-3000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
        wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", proc.stderr)[1]
        times = json.loads((Path(tmp) / "times.json").read_text())
    wall_s = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    synth_s, search_s = times["stage1_s"], times["stage2_s"]
    small = search_preset("default", BitsSpec.parse(args.bits), **SMALL_SEARCH)
    per_step = synth_s / args.synth_steps
    est = {"stage1_default_s": per_step * synth_preset("default").steps}
    rows = [
        ("peak RSS", f"{rss_kb / 2**20:.2f} GiB"),
        ("wall (measured run)", f"{wall_s:.0f} s"),
        ("Stage 1 per step (32 images)", f"{per_step:.2f} s"),
        ("Stage 1 default preset (estimate)", f"{est['stage1_default_s'] / 60:.1f} min"),
        (f"Stage 2, {args.layers} layers x (1 candidate + 1 refinement)", f"{search_s:.0f} s"),
        *(
            [(f"scale refinement, {args.refine_steps} steps", f"{times['refine_s']:.0f} s")]
            if "refine_s" in times
            else []
        ),
        ("QDQ export + ORT parity", f"{times['export_parity_s']:.0f} s"),
        ("ORT / fake-quant agreement (32 images)", f"{100 * times['agreement']:.1f}%"),
    ]
    print(f"{args.model} {args.bits} {args.target}, random weights, CPU")
    print_table(["measure", "value"], [list(r) for r in rows])
    atomic.write_json(
        args.out or RESULTS / f"memory_{args.model}_{args.bits.replace(':', '')}.json",
        {
            "model": args.model,
            "bits": args.bits,
            "target": args.target,
            "peak_rss_kb": rss_kb,
            "wall_s": wall_s,
            "synth_steps": args.synth_steps,
            "search": small.to_dict(),
            "search_layers": args.layers,
            "refine_steps": args.refine_steps if "refine_s" in times else 0,
            "times": times,
            "stage1_seconds": synth_s,
            "stage2_seconds": search_s,
            "per_step_s": per_step,
            "estimates": est,
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
