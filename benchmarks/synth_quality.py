"""Stage 1 quality: which calibration images give the best min-max / percentile ranges?

For each source (Gaussian noise, PSAQ-ViT v1, CLAMP-synth, and 32 real training images as the
upper anchor) and seed: calibrate fmnist_vit at each rung of the ladder, under the ort and trt
profiles, with min-max and with percentile ranges; report top-1 on the full 10k Fashion-MNIST
test set as mean ± std over seeds, plus each generator's misprediction rate and time.

    .venv/bin/python benchmarks/synth_quality.py [--seeds 0,1,2] [--synth-preset default]

Prints a table and writes benchmarks/results/synth_quality.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Cells,
    base_parser,
    calibration_images,
    cell_key,
    evaluate_cell,
    fmt_pct,
    load_reference,
    mean_std,
    print_table,
    quantized_model,
)

from clamp_export import atomic  # noqa: E402
from clamp_export.synth import preset  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LADDER = ("w8a8", "w4a8", "w4a6", "w4a4", "w3a4")
SOURCES = ("noise", "psaq", "clamp", "real")


def main() -> None:
    ap = base_parser(__doc__, LADDER, RESULTS / "synth_quality.json")
    ap.add_argument("--ranges", default="minmax,percentile")
    ap.add_argument("--sources", default=",".join(SOURCES))
    args = ap.parse_args()
    torch.set_grad_enabled(True)

    loaded, x_test, y_test, fp32 = load_reference(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = Cells(args.cells, args.fresh)
    acc: dict[str, list[float]] = {}
    gen_stats: dict[str, dict[str, list[float]]] = {}
    for source in args.sources.split(","):
        for seed in seeds:
            loaded_set: list[tuple] = []  # generated on first need: --cached-only may need none
            cells_before = sum(map(len, acc.values()))

            def calib_set(source=source, seed=seed, memo=loaded_set):
                if not memo:
                    memo.append(calibration_images(loaded, source, args.n, seed, args.synth_preset))
                return memo[0]

            for target in args.targets.split(","):
                for bits in args.bits.split(","):
                    for rng in args.ranges.split(","):
                        key = cell_key(loaded, x_test, args, seed, source, target, bits, rng)
                        if args.cached_only and not cells.has(key):
                            continue
                        rec = evaluate_cell(
                            cells,
                            key,
                            lambda b=bits, t=target, r=rng: quantized_model(
                                loaded, b, t, calib_set()[0], r
                            ),
                            x_test,
                            y_test,
                        )
                        acc.setdefault(f"{source}|{target}|{bits}|{rng}", []).append(rec["top1"])
            if sum(map(len, acc.values())) > cells_before:  # this set was used: its stats
                for k, v in calib_set()[1].items():
                    if v is not None:
                        gen_stats.setdefault(source, {}).setdefault(k, []).append(v)
            print(f"  done: {source} seed {seed}", flush=True)

    header = ["target", "bits", "range", *args.sources.split(",")]
    rows = []
    for target in args.targets.split(","):
        for bits in args.bits.split(","):
            for rng in args.ranges.split(","):
                rows.append(
                    [
                        target,
                        bits,
                        rng,
                        *(
                            fmt_pct(acc.get(f"{s}|{target}|{bits}|{rng}", []), len(seeds))
                            for s in args.sources.split(",")
                        ),
                    ]
                )
    print(
        f"\ntop-1 % on {len(x_test)} Fashion-MNIST test images (FP32 {100 * fp32:.2f}), mean ± std over seeds {seeds}"
    )
    print_table(header, rows)
    print()
    gen_rows = []
    for s, st in gen_stats.items():
        mis = st.get("misprediction_rate")
        gen_rows.append([s, fmt_pct(mis) if mis else "-", f"{mean_std(st['seconds'])[0]:.1f}"])
    print_table(["source", "misprediction %", "generation s"], gen_rows)
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "fp32": fp32,
            "eval_images": len(x_test),
            "seeds": seeds,
            "synth_preset": args.synth_preset,
            "synth_config": {
                s: preset(args.synth_preset, method=s).to_dict() for s in ("noise", "psaq", "clamp")
            },
            "accuracy": {
                k: {"values": v, "mean": mean_std(v)[0], "std": mean_std(v)[1]}
                for k, v in acc.items()
            },
            "generation": gen_stats,
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
