"""Does a longer search buy accuracy? Top-1 after every pass of one Stage 2 run.

The search runs pass by pass through its own checkpoint (``stop_after`` one pass, then
``resume``), which continues exactly as an uninterrupted run would; after each pass the
fake-quant model is scored on the test set. It measures the search alone (``refine_steps=0``:
the scale refinement after the last pass would blur that pass's number). The first passes of a
``--passes 6`` run are the default's 3 passes bit for bit, so pass 3 reproduces the
``clamp-no-refine`` cell in accuracy.py. The
fitness F is printed beside top-1, scored on the Stage 1 images (fixed, unlike the refreshed
batch the search sees): where it keeps falling while top-1 wanders, more search only fits the 32
calibration images harder.

    .venv/bin/python benchmarks/search_passes.py [--bits w4a4] [--targets ort,trt]
        [--seeds 0,1] [--passes 6] [--search-preset default]

Each run is a cell of benchmarks/results/cells.jsonl (runs for other targets or seeds may go in
parallel; ``--cached-only`` tabulates them). Prints a table and writes
benchmarks/results/search_passes.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Cells,
    base_parser,
    calibration_images,
    cell_key,
    load_reference,
    print_table,
    searchable_model,
    top1,
)

from clamp_export import atomic  # noqa: E402
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.fakequant import collect_qparams  # noqa: E402
from clamp_export.search import preset, run_search  # noqa: E402
from clamp_export.search.driver import model_evaluator  # noqa: E402
from clamp_export.search.stages import searchable_layers  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pass_curve(
    loaded, calib, bits: str, target: str, cfg, x_test, y_test, keep: Path | None = None
) -> dict:
    """{"curve": [{pass, top1, fitness, seconds}]} of one search, scored after each pass.

    ``keep``: a folder to save each pass's qparams.json in, to study them afterwards.
    """
    fp, qm = searchable_model(loaded, bits, target, calib, "minmax", cfg)  # the min-max start
    layers = len(searchable_layers(qm))
    header = {"model": loaded.name, "target": target, "bits": bits}
    bounds = loaded.preprocess.pixel_bounds()
    fitness = model_evaluator(cfg, fp, qm, calib)  # F on the Stage 1 images
    curve = []
    with tempfile.TemporaryDirectory() as run_dir:
        for p in range(cfg.passes):
            t = time.time()
            run_search(
                fp,
                qm,
                calib,
                cfg,
                header,
                bounds,
                run_dir=Path(run_dir),
                resume=p > 0,
                progress=False,
                stop_after=layers,
            )
            seconds = time.time() - t
            if keep is not None:
                qp = collect_qparams(qm, **header)
                qp.save(keep / f"{target}_{bits}_seed{cfg.seed}_pass{p + 1}.qparams.json")
            curve.append(
                {
                    "pass": p + 1,
                    "top1": top1(qm, x_test, y_test),
                    "fitness": fitness(),
                    "seconds": seconds,
                }
            )
            c = curve[-1]
            print(
                f"  {target} {bits} seed {cfg.seed} pass {c['pass']}: {100 * c['top1']:.2f}% "
                f"(fitness {c['fitness']:.4f}, {seconds:.0f} s)",
                flush=True,
            )
    return {"curve": curve}


def main() -> None:
    ap = base_parser(__doc__, ("w4a4",), RESULTS / "search_passes.json")
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--search-preset", default="default")
    ap.add_argument("--keep-qparams", type=Path, help="save every pass's qparams.json here")
    ap.set_defaults(seeds="0,1")
    args = ap.parse_args()
    if any(BitsSpec.parse(b).mixed for b in args.bits.split(",")):
        raise SystemExit("search_passes.py takes fixed bit-widths (w4a4, w8a8, ...), not mp:*")

    loaded, x_test, y_test, fp32 = load_reference(args)
    if args.keep_qparams:
        args.keep_qparams.mkdir(parents=True, exist_ok=True)
    cells = Cells(args.cells, args.fresh)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        images = None
        for target in args.targets.split(","):
            for bits in args.bits.split(","):
                cfg = preset(
                    args.search_preset,
                    BitsSpec.parse(bits),
                    seed=seed,
                    passes=args.passes,
                    refine_steps=0,
                )
                key = cell_key(loaded, x_test, args, seed, "clamp", target, bits, "passes", cfg)
                if args.cached_only and not cells.has(key):
                    continue
                if images is None:
                    images, _ = calibration_images(loaded, "clamp", args.n, seed, args.synth_preset)
                rec = cells.get_or_run(
                    key,
                    partial(
                        pass_curve,
                        loaded,
                        images,
                        bits,
                        target,
                        cfg,
                        x_test,
                        y_test,
                        args.keep_qparams,
                    ),
                )
                runs.append({"target": target, "bits": bits, "seed": seed, **rec})

    print(f"\ntop-1 % after each pass (FP32 {100 * fp32:.2f}); fitness F on the Stage 1 images")
    print_table(
        ["target", "bits", "seed", *(f"pass {p + 1}" for p in range(args.passes))],
        [
            [r["target"], r["bits"], str(r["seed"])]
            + [f"{100 * c['top1']:.2f} ({c['fitness']:.3f})" for c in r["curve"]]
            for r in runs
        ],
    )
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "eval_images": len(x_test),
            "fp32_top1": fp32,
            "search": {
                b: preset(
                    args.search_preset, BitsSpec.parse(b), passes=args.passes, refine_steps=0
                ).to_dict()
                for b in args.bits.split(",")
            },
            "runs": runs,
            "versions": versions(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
