"""Where does a quantized model lose its accuracy? Put one group of quantizers back in float at a
time and measure what top-1 that recovers.

For each target and method (full CLAMP, or a baseline such as noise-percentile) the model is
calibrated once, exactly as `accuracy.py` does it; then each group (the block weights, the
softmax output, the GELU output, ...) is switched off in turn. A large gain names the range worth
searching; gains that are all small say the error is spread over the whole model.

    .venv/bin/python benchmarks/error_breakdown.py [--bits w4a4] [--targets ort,trt]
        [--methods clamp,noise-percentile] [--seeds 0]

Prints a table (points of top-1 recovered per group) and writes
benchmarks/results/error_breakdown.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import recipe  # noqa: E402
from common import (  # noqa: E402
    base_parser,
    calibration_images,
    load_reference,
    print_table,
    quantized_model,
    top1,
)

from clamp_export import atomic  # noqa: E402
from clamp_export.quant.fakequant import quantizers  # noqa: E402
from clamp_export.quant.qparams import WEIGHT_ROLE  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INPUT_GROUPS = {
    "qkv": "LayerNorm 1 output (qkv input)",
    "proj": "attention output (proj input)",
    "fc1": "LayerNorm 2 output (fc1 input)",
    "fc2": "GELU output (fc2 input)",
}
ATTN_GROUPS = {"q": "q", "k": "k", "attn": "softmax output", "v": "v"}


def group_of(name: str, role: str) -> str:
    """The DESIGN §2 quant point a quantizer stands at, pooled over the blocks."""
    if name.startswith(("patch_embed", "head")):
        return "patch embedding + head (8-bit edges)"
    if role == WEIGHT_ROLE:
        return "block weights"
    if role in ATTN_GROUPS:
        return ATTN_GROUPS[role]
    return INPUT_GROUPS[name.rsplit(".", 1)[-1]]


def breakdown(qmodel, x, y) -> dict[str, float]:
    """Top-1 with everything quantized, then with each group in float (the others quantized)."""
    groups: dict[str, list] = {}
    for name, role, q in quantizers(qmodel):
        groups.setdefault(group_of(name, role), []).append(q)
    out = {"all quantized": top1(qmodel, x, y)}
    for g, qs in groups.items():
        modes = [q.mode for q in qs]
        for q in qs:
            q.mode = "off"
        out[g] = top1(qmodel, x, y)
        for q, m in zip(qs, modes, strict=True):
            q.mode = m
    return out


def main() -> None:
    ap = base_parser(__doc__, ("w4a4",), RESULTS / "error_breakdown.json")
    ap.set_defaults(seeds="0")
    ap.add_argument("--methods", default="clamp,noise-percentile")
    args = ap.parse_args()

    loaded, x_test, y_test, fp32 = load_reference(args)
    results: dict[str, dict[str, float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            src = recipe(method, seed, "w8a8")[0]
            calib, _ = calibration_images(loaded, src, args.n, seed, args.synth_preset)
            for target in args.targets.split(","):
                for bits in args.bits.split(","):
                    _, rng, search = recipe(method, seed, bits)
                    qm = quantized_model(loaded, bits, target, calib, rng, search)
                    column = f"{method} {target} {bits} seed {seed}"
                    results[column] = breakdown(qm, x_test, y_test)
                    print(f"  {column}: {100 * results[column]['all quantized']:.2f}%", flush=True)

    columns = list(results)
    groups = list(results[columns[0]])
    rows = [["all quantized", *(f"{100 * results[c]['all quantized']:.2f}" for c in columns)]]
    for g in groups[1:]:
        gains = (100 * (results[c][g] - results[c]["all quantized"]) for c in columns)
        rows.append([f"{g} in float", *(f"{d:+.2f}" for d in gains)])
    print(f"\ntop-1 % and points recovered by floating one group (FP32 {100 * fp32:.2f})")
    print_table(["group", *columns], rows)
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "fp32": fp32,
            "eval_images": len(x_test),
            "top1": results,
            "search_config": {
                f"{m} {b}": cfg.to_dict()
                for m in args.methods.split(",")
                for b in args.bits.split(",")
                if (cfg := recipe(m, 0, b)[2]) is not None
            },
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
