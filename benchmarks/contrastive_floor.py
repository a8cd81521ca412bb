"""Is L_C2 still a fitness at these bits? The quantized blocks' L_C2 against its floor.

L_C2 is an InfoNCE over the batch at each token: it asks whether each image's quantized feature
picks out its own float feature among the others. The float model scored against itself gives
the value a perfect quantizer would reach (the floor). Where the min-max calibrated model already
sits at the floor, the search's L_C2 has nothing left to measure but how separable the features
are, so it can fall below the floor by moving away from the float model. Printed per block:
quantized L_C2 minus the floor, and L_O (mean absolute error of the logits), on the 32 Stage 1
images a cell searches on (CLAMP's, seed 0).

    .venv/bin/python benchmarks/contrastive_floor.py [--models fmnist_vit,fmnist_vit_reg4]
        [--bits w8a8,w4a8,w4a4] [--target trt]

Prints a table and writes benchmarks/results/contrastive_floor.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibration_images, print_table, searchable_model  # noqa: E402

from clamp_export import atomic  # noqa: E402
from clamp_export.models import load_model  # noqa: E402
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.fakequant import set_mode  # noqa: E402
from clamp_export.search import preset, stages  # noqa: E402
from clamp_export.search.fitness import local_contrastive, output_error  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def block_outputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[list, torch.Tensor]:
    return stages.tail(model, stages.embed(model, images), 0)


def measure(loaded, images: torch.Tensor, bits: str, target: str, tau: float) -> dict:
    search = preset("default", BitsSpec.parse(bits), seed=0)  # decides the equalization
    fp, qm = searchable_model(loaded, bits, target, images, "minmax", search)
    set_mode(qm, "quant")
    fp_outs, fp_logits = block_outputs(fp, images)
    q_outs, q_logits = block_outputs(qm, images)
    floor = [float(local_contrastive(f, f, tau)) for f in fp_outs]
    quant = [float(local_contrastive(q, f, tau)) for q, f in zip(q_outs, fp_outs, strict=True)]
    return {
        "model": loaded.name,
        "bits": bits,
        "target": target,
        "floor": floor,
        "quantized": quant,
        "gap": [q - f for q, f in zip(quant, floor, strict=True)],
        "output_error": float(output_error(q_logits, fp_logits)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fmnist_vit,fmnist_vit_reg4")
    ap.add_argument("--bits", default="w8a8,w4a8,w4a4")
    ap.add_argument("--target", default="trt")
    ap.add_argument("--out", type=Path, default=RESULTS / "contrastive_floor.json")
    args = ap.parse_args()
    tau = preset("default").tau
    rows = []
    for name in args.models.split(","):  # one model load and Stage 1 set for all its bit-widths
        loaded = load_model(name)
        images, _ = calibration_images(loaded, "clamp", 32, 0)
        rows += [measure(loaded, images, b, args.target, tau) for b in args.bits.split(",")]
    print_table(
        ["model", "bits", "L_C2 − floor per block (×1000)", "min", "max", "L_O"],
        [
            [
                r["model"],
                r["bits"],
                " ".join(f"{1000 * g:+.1f}" for g in r["gap"]),
                f"{1000 * min(r['gap']):+.1f}",
                f"{1000 * max(r['gap']):+.1f}",
                f"{r['output_error']:.4f}",
            ]
            for r in rows
        ],
    )
    atomic.write_json(args.out, {"tau": tau, "rows": rows, "versions": versions()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
