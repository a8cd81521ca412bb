"""TensorRT accepts the `trt` graphs of 224-px ViTs: parse and ahead-of-time build, timed.

For each model (random weights: the graphs' structure and sizes are the point, not accuracy) and
each precision (W8A8, W4A8, W4A16 QDQ graphs calibrated on noise, and the FP16 float graph), it
exports the graph, lints it, and builds an engine with whichever TensorRT is installed
(TensorRT-RTX builds on the CPU). Records export and build seconds, ONNX and plan bytes.

    .venv/bin/python benchmarks/trt_build.py [--models deit_t,deit_s] [--bits w8a8,w4a8,w4a16,fp16]

Prints a table and writes benchmarks/results/trt_build.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

from clamp_export import atomic  # noqa: E402
from clamp_export.build.stage import build_stage  # noqa: E402
from clamp_export.build.trt import BuildOptions  # noqa: E402
from clamp_export.data.sources import noise_images  # noqa: E402
from clamp_export.export.qdq import export_float, export_qdq  # noqa: E402
from clamp_export.models import load_model  # noqa: E402
from clamp_export.quant.bits import BitsSpec  # noqa: E402
from clamp_export.quant.calibrate import calibrate  # noqa: E402
from clamp_export.quant.fakequant import wrap_model  # noqa: E402
from clamp_export.quant.targets import get_profile  # noqa: E402
from clamp_export.versions import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _export(loaded, bits: str, path: Path) -> bool:
    """The graph of one precision; True when it is a quantized (linted) graph."""
    size = loaded.preprocess.input_size
    if bits == "fp16":
        export_float(loaded.model, size, path, torch.float16)
        return False
    profile = get_profile("trt")
    qm = wrap_model(loaded.model, BitsSpec.parse(bits), profile)
    calibrate(qm, noise_images(4, loaded.preprocess))
    export_qdq(qm, size, profile, path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="deit_t,deit_s")
    ap.add_argument("--bits", default="w8a8,w4a8,w4a16,fp16")
    ap.add_argument("--out", type=Path, default=RESULTS / "trt_build.json")
    args = ap.parse_args()
    cells = []
    torch.manual_seed(0)
    for name in args.models.split(","):
        loaded = load_model(name, random_init=True)
        for bits in args.bits.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                graph = Path(tmp) / "model.onnx"
                t0 = time.time()
                quantized = _export(loaded, bits, graph)
                export_s = time.time() - t0
                record = build_stage(
                    graph,
                    "trt",
                    Path(tmp),
                    lambda m, tag=f"{name} {bits}": print(f"  {tag}: {m}", flush=True),
                    BuildOptions(batches=(1, 8, 32)),
                    baseline=not quantized,
                )
                if "skipped" in record:
                    sys.exit(f"trt_build: {record['skipped']}")
                cells.append(
                    {
                        "model": name,
                        "bits": bits,
                        "export_seconds": round(export_s, 1),
                        "build_seconds": record["build_seconds"],
                        "onnx_bytes": graph.stat().st_size,
                        "plan_bytes": record["plan_bytes"],
                        "network_layers": record["network_layers"],
                        "tensorrt": f"{record['module']} {record['version']}",
                    }
                )
    rows = [
        [
            c["model"],
            c["bits"],
            f"{c['export_seconds']:.1f}",
            f"{c['build_seconds']:.1f}",
            f"{c['onnx_bytes'] / 1e6:.1f}",
            f"{c['plan_bytes'] / 1e6:.1f}",
            str(c["network_layers"]),
        ]
        for c in cells
    ]
    print(f"\n{cells[0]['tensorrt']}, 224 px, random weights, profile batch 1..32")
    print_table(["model", "graph", "export s", "build s", "ONNX MB", "plan MB", "layers"], rows)
    atomic.write_json(args.out, {"cells": cells, "versions": versions()})


if __name__ == "__main__":
    main()
