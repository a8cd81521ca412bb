"""Stage 1 + Stage 2 wall time on a CUDA GPU (random weights, default presets).

The pipeline runs on CPUs; this times the same stages with the model on the GPU: Stage 1
(default synthesis preset) and Stage 2 (default search preset, checkpointed per layer as the CLI
does). Stage 2 runs pass by pass, resuming its checkpoint, and stops before a pass that would
overrun ``--budget-s``: passes left out are projected from the last one run, and marked so.

    python benchmarks/gpu_time.py [--model deit_s] [--bits w4a8] [--target trt] [--budget-s 420]

Prints a table and writes benchmarks/results/gpu_<model>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table

from clamp_export import atomic
from clamp_export.models import load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.search import prepare_equalization, run_search
from clamp_export.search import preset as search_preset
from clamp_export.search.stages import searchable_layers
from clamp_export.synth import preset as synth_preset
from clamp_export.synth import synthesize
from clamp_export.versions import versions

RESULTS = Path(__file__).resolve().parent / "results"


def _clock() -> float:
    torch.cuda.synchronize()
    return time.time()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="deit_s")
    ap.add_argument("--bits", default="w4a8")
    ap.add_argument("--target", default="trt")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop Stage 2 before this")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark times the stages on one")

    loaded = load_model(args.model, random_init=True)
    loaded.model.cuda()
    t_start = t0 = _clock()
    synth, _ = synthesize(loaded, synth_preset("default"), None, log=lambda _: None, progress=False)
    stage1 = _clock() - t0
    print(f"Stage 1: {stage1:.1f} s ({len(synth.loss_curve)} steps)", flush=True)

    profile = get_profile(args.target)
    t0 = _clock()
    images = synth.images.cuda()
    cfg = search_preset("default", BitsSpec.parse(args.bits))
    qm = wrap_model(loaded.model, BitsSpec.parse(args.bits), profile)
    fp = prepare_equalization(loaded.model, qm, images, cfg)
    calibrate(qm, images)
    calib = _clock() - t0
    layers = len(searchable_layers(qm))
    header = {"model": args.model, "target": args.target, "bits": args.bits}
    passes: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        for p in range(cfg.passes):
            if passes and _clock() - t_start + passes[-1] > args.budget_s:
                break
            t0 = _clock()
            run_search(
                fp,
                qm,
                images,
                cfg,
                header,
                loaded.preprocess.pixel_bounds(),
                run_dir=Path(run_dir),
                resume=p > 0,
                progress=False,
                stop_after=layers,
            )
            passes.append(_clock() - t0)
            print(f"Stage 2 pass {p + 1}/{cfg.passes}: {passes[-1]:.1f} s", flush=True)
    projected = passes + [passes[-1]] * (cfg.passes - len(passes))
    stage2 = sum(projected)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    rows = [
        ("Stage 1 (default preset)", f"{stage1:.1f} s"),
        ("min-max calibration", f"{calib:.1f} s"),
        (f"Stage 2 ({cfg.passes} passes x {layers} layers)", f"{stage2:.1f} s"),
        ("  passes measured", f"{len(passes)} of {cfg.passes}"),
        ("Stage 1 + Stage 2", f"{stage1 + stage2:.1f} s"),
        ("peak GPU memory", f"{peak_gib:.2f} GiB"),
    ]
    gpu = torch.cuda.get_device_name()
    print(f"\n{args.model} {args.bits} {args.target}, random weights, {gpu}")
    print_table(["measure", "value"], [list(r) for r in rows])
    atomic.write_json(
        args.out or RESULTS / f"gpu_{args.model}.json",
        {
            "model": args.model,
            "bits": args.bits,
            "target": args.target,
            "gpu": gpu,
            "stage1_s": stage1,
            "calibration_s": calib,
            "stage2_pass_s": passes,
            "stage2_s": stage2,
            "stage2_projected_passes": cfg.passes - len(passes),
            "total_s": stage1 + stage2,
            "peak_gpu_gib": peak_gib,
            "synth_config": synth.config.to_dict(),
            "search_config": cfg.to_dict(),
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
