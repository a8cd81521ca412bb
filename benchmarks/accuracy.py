"""Stage 2 accuracy: full CLAMP-ViT against every baseline, on the 10k Fashion-MNIST test set.

Methods: noise / psaq / clamp-synth / real (32 train images) calibration with min-max and with
percentile ranges; full CLAMP (Stage 1 + search + cyclic, fitness L_C2, channel scan); the same
search on the real images instead of Stage 1's; and the ablations: no channel scan, no cyclic
adaptation, the paper's L_C2 + L_O with and without cyclic adaptation, L_O only, and each
feature of the current default turned off alone (``clamp-without-*``); and a
``-twin`` variant of each baseline and of full CLAMP, with a twin-uniform softmax output. Ladder
W8A8 ... W3A4 and mixed precision under the ort and trt profiles, mean ± std over seeds, time per
method. ``--parity`` adds ONNX Runtime's top-1 on each cell's exported graph and its agreement
with the fake-quant model (on `trt` the FP16 graph with its rounding explicit).

    .venv/bin/python benchmarks/accuracy.py [--model fmnist_vit_reg4] [--seeds 0,1,2]
        [--bits w4a4,w4a8] [--targets trt] [--parity]

Prints a table and writes benchmarks/results/accuracy.json.
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
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.targets import get_profile  # noqa: E402
from clamp_export.search import preset as search_preset  # noqa: E402
from clamp_export.search.config import REFINE_SHIFT, REFINE_STEPS  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LADDER = ("w8a8", "w6a6", "w4a8", "w4a6", "w4a4", "w3a4", "mp:4.7", "mp:3.5")
BASELINES = tuple(
    f"{s}-{r}" for s in ("noise", "psaq", "clamp-synth", "real") for r in ("minmax", "percentile")
)
# The search alone: the default before the scale refinement joined it below 8-bit activations.
# The earlier rows ran without it, and their cells stay in the tables as measured.
SEARCH_ONLY = {"refine_steps": 0}
# The search before the per-channel weight scan and channel equalization joined it.
LEGACY = {**SEARCH_ONLY, "channel_scan": (), "equalize": False}
# The scale refinement on the KL: the default below 8-bit activations before "The refinement on
# logprob_mse" (docs/results.md). The variants measured on top of that default keep it (``**KL``),
# so their stored cells stay theirs; at 8-bit activations and without the refinement it changes
# nothing.
KL = {"refine_loss": "kl"}
# CLAMP variants: (calibration image source, search config overrides)
CLAMP = {
    "clamp": ("clamp", {}),
    "clamp-kl-refine": ("clamp", KL),
    # the default before "The search in half the time": 3 passes, an image refresh every C/2
    # cycles (its cells keep their keys: stored configs without refresh_every mean C/2)
    "clamp-3pass": ("clamp", {**KL, "passes": 3, "refresh_every": 0}),  # = thorough, on the KL
    # the ablations, on top of the default
    "clamp-no-cyclic": ("clamp", {**KL, "cyclic": False}),
    "clamp-L_C2+L_O": ("clamp", {**KL, "fitness": "both"}),  # the paper's fitness
    "clamp-L_O-only": ("clamp", {**KL, "fitness": "output"}),
    # one more feature of the default off at a time (with clamp-no-cyclic, clamp-no-refine)
    "clamp-without-equalize": ("clamp", {**KL, "equalize": False}),
    "clamp-without-channel-scan": ("clamp", {**KL, "channel_scan": ()}),
    # refined on the images as they are
    "clamp-without-shift": ("clamp", {**KL, "refine_shift": 0.0}),
    # L_C2 alone at every bit-width: the default at 8-bit activations before L_O joined it there
    "clamp-L_C2-only": ("clamp", {**KL, "fitness": "contrastive"}),
    # the previous default: the scale refinement for 100 steps on the unshifted Stage 1 images
    "clamp-unshifted-refine": ("clamp", {**KL, "refine_steps": 100, "refine_shift": 0.0}),
    # the default before the scale refinement, and the same ablations on top of it
    "clamp-no-refine": ("clamp", SEARCH_ONLY),
    "clamp-no-refine-no-cyclic": ("clamp", {**SEARCH_ONLY, "cyclic": False}),
    "clamp-no-refine-L_C2+L_O": ("clamp", {**SEARCH_ONLY, "fitness": "both"}),
    "clamp-no-refine-L_O-only": ("clamp", {**SEARCH_ONLY, "fitness": "output"}),
    # the search before channel equalization (which is on below 8-bit activations)
    "clamp-no-equalize": ("clamp", {**SEARCH_ONLY, "equalize": False}),
    # the same search on the 32 real training images: does synthetic data limit the search?
    "clamp-no-equalize-on-real": ("real", {**SEARCH_ONLY, "equalize": False}),
    "clamp-no-channel-scan": ("clamp", LEGACY),
    # the 8-bit diagnostics: no coarse activation-scale scan; the scale refinement (on below
    # 8-bit activations) turned on at 8 bits too
    "clamp-no-act-scan": ("clamp", {**KL, "scan": ()}),
    "clamp-refine": ("clamp", {**KL, "refine_steps": REFINE_STEPS, "refine_shift": REFINE_SHIFT}),
    # twice the default refinement below 8-bit activations: does the deeper model want more?
    "clamp-refine-600": ("clamp", {**KL, "refine_steps": 2 * REFINE_STEPS}),
    # the refinement also matching every block output to the float one (refine.feature_loss);
    # on a min-max W4A4 model the term is 3-5x the logit KL at weight 1
    "clamp-refine-features": ("clamp", {**KL, "refine_features": 1.0}),
    # the default with each refinement image also mirrored left to right at random, as the
    # reference models were trained (docs/results.md, "Where the refinement stops")
    "clamp-refine-flip": ("clamp", {"refine_flip": True}),
    "clamp-legacy-no-cyclic": ("clamp", {**LEGACY, "cyclic": False}),
    "clamp-legacy-L_C2+L_O": ("clamp", {**LEGACY, "fitness": "both"}),
    "clamp-legacy-L_C2+L_O-no-cyclic": ("clamp", {**LEGACY, "fitness": "both", "cyclic": False}),
    "clamp-legacy-L_O-only": ("clamp", {**LEGACY, "fitness": "output"}),
}


TWIN = "-twin"  # a method name with this suffix: the same recipe, twin-uniform softmax output


def softmax_of(method: str) -> tuple[str, str]:
    """(method without the suffix, softmax levels for wrap_model)."""
    if method.endswith(TWIN):
        return method.removesuffix(TWIN), "twin"
    return method, "uniform"


def recipe(method: str, seed: int, bits: str, search: str = "default"):
    """(image source, range method, SearchConfig or None) for a method name of this benchmark."""
    method = softmax_of(method)[0]
    if method in CLAMP:
        source, overrides = CLAMP[method]
        return source, "minmax", search_preset(search, BitsSpec.parse(bits), seed=seed, **overrides)
    if method not in BASELINES:
        raise SystemExit(
            f"unknown method {method!r}; choose from {', '.join(BASELINES + tuple(CLAMP))}"
        )
    src, rng = method.rsplit("-", 1)
    return ("clamp" if src == "clamp-synth" else src), rng, None


def main() -> None:
    ap = base_parser(__doc__, LADDER, RESULTS / "accuracy.json")
    twin = tuple(
        m + TWIN
        for m in (
            *BASELINES,
            "clamp",
            "clamp-kl-refine",
            "clamp-unshifted-refine",
            "clamp-no-refine",
        )
    )
    ap.add_argument("--methods", default=",".join(BASELINES + tuple(CLAMP) + twin))
    ap.add_argument("--search-preset", default="default")
    ap.add_argument(
        "--parity",
        action="store_true",
        help="also export each computed cell and run ONNX Runtime on the graph: its top-1 and its "
        "agreement with fake-quant (cells already stored keep what they hold)",
    )
    args = ap.parse_args()

    loaded, x_test, y_test, fp32 = load_reference(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    acc: dict[str, list[float]] = {}
    agree: dict[str, list[float]] = {}  # ORT on the exported graph vs fake-quant (--parity)
    ort_acc: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    cells = Cells(args.cells, args.fresh)
    for seed in seeds:
        images: dict[str, tuple] = {}
        for target in args.targets.split(","):
            for bits in args.bits.split(","):
                for method in methods:
                    src, rng, search = recipe(method, seed, bits, args.search_preset)
                    softmax = softmax_of(method)[1]
                    key = cell_key(
                        loaded,
                        x_test,
                        args,
                        seed,
                        src,
                        target,
                        bits,
                        "search" if search else rng,  # the search config says which
                        search,
                        softmax,
                    )
                    if args.cached_only and not cells.has(key):
                        continue
                    if src not in images:
                        images[src] = calibration_images(
                            loaded, src, args.n, seed, args.synth_preset
                        )
                    calib, gen = images[src]
                    rec = evaluate_cell(
                        cells,
                        key,
                        lambda: quantized_model(loaded, bits, target, calib, rng, search, softmax),  # noqa: B023
                        x_test,
                        y_test,
                        deployed=args.parity,
                    )
                    cell = f"{method}|{target}|{bits}"
                    acc.setdefault(cell, []).append(rec["top1"])
                    if "agreement" in rec:
                        agree.setdefault(cell, []).append(rec["agreement"])
                        ort_acc.setdefault(cell, []).append(rec["ort_top1"])
                    seconds.setdefault(method, []).append(rec["seconds"] + gen["seconds"])
                    print(
                        f"  seed {seed} {target} {bits} {method}: {100 * rec['top1']:.2f}%",
                        flush=True,
                    )

    header = ["target", "bits", *methods]
    rows = [
        [t, b, *(fmt_pct(acc.get(f"{m}|{t}|{b}", []), len(seeds)) for m in methods)]
        for t in args.targets.split(",")
        for b in args.bits.split(",")
    ]
    print(
        f"\ntop-1 % on {len(x_test)} test images (FP32 {100 * fp32:.2f}), mean ± std over seeds {seeds}"
    )
    print_table(header, rows)
    if agree:
        print("\nORT on the exported graph: top-1 % and top-1 agreement % with fake-quant")
        print_table(
            ["cell", "ORT top-1", "agreement"],
            [
                [c, fmt_pct(ort_acc[c], len(seeds)), fmt_pct(v, len(seeds))]
                for c, v in agree.items()
            ],
        )
    print("\ntime per cell")
    print_table(
        ["method", "seconds (mean, incl. image generation)"],
        [[m, f"{mean_std(seconds[m])[0]:.1f}"] for m in methods if m in seconds],
    )
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "fp32": fp32,
            "eval_images": len(x_test),
            "seeds": seeds,
            "synth_preset": args.synth_preset,
            "profiles": {t: get_profile(t).to_dict() for t in args.targets.split(",")},
            # at W4A4; below 8-bit activations "clamp" also equalizes and refines (low_activation_bits)
            "search_config": {
                m: search_preset(args.search_preset, BitsSpec.parse("w4a4"), **o).to_dict()
                for m, (_, o) in CLAMP.items()
            },
            "accuracy": {
                k: {"values": v, "mean": mean_std(v)[0], "std": mean_std(v)[1]}
                for k, v in acc.items()
            },
            "deployed": {
                k: {
                    "ort_top1": ort_acc[k],
                    "agreement": v,
                    "agreement_mean": mean_std(v)[0],
                }
                for k, v in agree.items()
            },
            "seconds": {m: mean_std(v)[0] for m, v in seconds.items()},
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
