"""What the `trt` profile's FP16 arithmetic costs: fake-quant forward time and Stage 2 search
time with every FP16 result rounded (the profile) against the same profile computed in FP32.

Both variants run in one process, interleaved, on the same 32 noise images (the search's batch),
so the ratio is what to read. Times are this process's CPU time (run it with one thread:
``OMP_NUM_THREADS=1``), which other processes on the machine barely move, where wall time
doubles when a second job shares the core; a search cannot be interleaved, so this is what makes
its ratio readable on a busy machine.

    .venv/bin/python benchmarks/fp16_cost.py [--models fmnist_vit,fmnist_vit_reg4] [--bits w4a4]

Prints a table and writes benchmarks/results/fp16_cost.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from clamp_export import atomic  # noqa: E402
from clamp_export.data.sources import noise_images  # noqa: E402
from clamp_export.models import load_model  # noqa: E402
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.calibrate import calibrate  # noqa: E402
from clamp_export.quant.fakequant import wrap_model  # noqa: E402
from clamp_export.quant.targets import get_profile  # noqa: E402
from clamp_export.search import preset, run_search  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _forward_ms(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(rounds):
            t = time.process_time()
            model(x)
            times.append(1000 * (time.process_time() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="fmnist_vit,fmnist_vit_reg4")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--search-preset", default="fast")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--no-search",
        action="store_true",
        help="forward passes only (they interleave; searches do not)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "fp16_cost.json")
    args = ap.parse_args()
    trt = get_profile("trt")
    variants = {
        "fp16 arithmetic": trt,
        "fp32 arithmetic": dataclasses.replace(trt, float_dtype="float32"),
    }
    bits = BitsSpec.parse(args.bits)
    rows, results = [], {}
    for name in args.models.split(","):
        loaded = load_model(name)
        x = noise_images(32, loaded.preprocess, seed=0)
        models = {k: calibrate(wrap_model(loaded.model, bits, p), x) for k, p in variants.items()}
        fwd = {k: [] for k in models}
        for _ in range(3):  # interleaved, so load changes hit both alike
            for k, m in models.items():
                fwd[k].append(_forward_ms(m, x, args.rounds))
        search: dict[str, float | None] = {k: None for k in models}
        cfg = preset(args.search_preset, bits, refine_steps=20, equalize=False)
        for k, m in {} if args.no_search else models.items():
            t = time.process_time()
            header = {"model": name, "target": "trt", "bits": args.bits}
            run_search(
                loaded.model, m, x, cfg, header, loaded.preprocess.pixel_bounds(), progress=False
            )
            search[k] = time.process_time() - t
        f16, f32 = (statistics.median(fwd[k]) for k in variants)
        results[name] = {
            "forward_ms": {k: statistics.median(v) for k, v in fwd.items()},
            "search_s": search,
        }
        s16, s32 = search["fp16 arithmetic"], search["fp32 arithmetic"]
        timed = s16 is not None and s32 is not None
        rows.append(
            [
                name,
                f"{f32:.1f}",
                f"{f16:.1f}",
                f"{f16 / f32:.2f}x",
                f"{s32:.0f}" if timed else "-",
                f"{s16:.0f}" if timed else "-",
                f"{s16 / s32:.2f}x" if timed else "-",
            ]
        )
    print(f"\n{args.bits} trt fake-quant, batch 32, {torch.get_num_threads()} threads, CPU time")
    print_table(
        [
            "model",
            "fwd ms FP32 arith",
            "fwd ms FP16 arith",
            "ratio",
            "search s FP32",
            "search s FP16",
            "ratio",
        ],
        rows,
    )
    atomic.write_json(
        args.out,
        {
            "bits": args.bits,
            "search_preset": None if args.no_search else args.search_preset,
            "threads": torch.get_num_threads(),
            "clock": "process CPU time",
            "results": results,
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
