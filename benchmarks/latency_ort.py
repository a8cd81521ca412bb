"""ORT CPU latency: FP32 vs our QDQ graphs (ort profile) vs ORT's own quantize_static.

Our graphs: W8A8, and W4A4 with uniform and with twin-uniform softmax levels (the twin adds a
Where and a second ``attn @ v`` matmul per block: what it costs is measured here, on the CPU).

DeiT-S at 224 px with random weights (no hub access here; latency does not depend on the values).
Pinned threads, warm-up, then N interleaved rounds per batch size (every graph once a round, in
a rotating order; speed-ups are the median of the per-round ratios: clamp_export.report.latency). Accuracy is the cosine of
each quantized graph's logits to FP32 on the same Gaussian inputs (random weights give no top-1).

    .venv/bin/python benchmarks/latency_ort.py [--model deit_s] [--threads 2] [--runs 20]

Prints a table and writes benchmarks/results/latency_ort.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from clamp_export import atomic
from clamp_export.data.sources import noise_images
from clamp_export.export.qdq import export_float, export_qdq
from clamp_export.models import load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.report.latency import Timing, time_interleaved
from clamp_export.report.parity import logit_error
from clamp_export.runtime.backends import Backend
from clamp_export.runtime.runners import OrtRunner
from clamp_export.versions import versions

RESULTS = Path(__file__).resolve().parent / "results"
OURS = {  # graph name -> (bits, softmax levels)
    "ours_w8a8": ("w8a8", "uniform"),
    "ours_w4a4": ("w4a4", "uniform"),
    "ours_w4a4_twin": ("w4a4", "twin"),
}


def ort_quantize_static(fp32_path: Path, out_path: Path, calib: np.ndarray) -> None:
    """ORT's own tool, as DESIGN §3 measured it: Q/DQ on MatMul/Gemm/Conv inputs, uint8 acts."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _batch_fn(runner: OrtRunner):
    return lambda x: torch.from_numpy(runner.run_batch(x.numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="deit_s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "latency_ort.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = load_model(args.model, random_init=True)
    pre = loaded.preprocess
    calib = noise_images(args.calib, pre, seed=0)
    probe = noise_images(16, pre, seed=1)
    graphs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graphs["fp32"] = tmp / "fp32.onnx"
        export_float(loaded.model, pre.input_size, graphs["fp32"])
        profile = get_profile("ort")
        for name, (bits, softmax) in OURS.items():
            qm = wrap_model(loaded.model, BitsSpec.parse(bits), profile, softmax)
            graphs[name] = tmp / f"{name}.onnx"
            export_qdq(calibrate(qm, calib), pre.input_size, profile, graphs[name])
        graphs["ort_quantize_static"] = tmp / "qs.onnx"
        ort_quantize_static(graphs["fp32"], graphs["ort_quantize_static"], calib.numpy())

        runners = {k: OrtRunner(p, k, threads=args.threads) for k, p in graphs.items()}
        fp32_logits = runners["fp32"](probe)
        results = {
            name: {
                "cosine_to_fp32": logit_error(runner(probe), fp32_logits).cosine,
                "bytes": graphs[name].stat().st_size,
                "latency": {},
            }
            for name, runner in runners.items()
        }
        # every graph timed in one interleaved loop per batch: ratios hold on a shared machine
        backends = {
            name: Backend(name, _batch_fn(r), None if name == "fp32" else "fp32")
            for name, r in runners.items()
        }
        timing = Timing(min_runs=args.runs, min_seconds=0)
        for b in (int(v) for v in args.batches.split(",")):
            x = noise_images(b, pre, seed=2)
            for name, lat in time_interleaved(backends, b, x, timing).items():
                results[name]["latency"][str(b)] = lat

    rows = []
    for name, r in results.items():
        for b, t in r["latency"].items():
            up = t.get("speedup", {}).get("ratio", 1.0)
            rows.append(
                (
                    name,
                    b,
                    f"{t['p50_ms']:.1f}",
                    f"{t['p90_ms']:.1f}",
                    f"{up:.2f}x",
                    f"{r['cosine_to_fp32']:.5f}",
                )
            )
    header = ("graph", "batch", "p50 ms", "p90 ms", "speed-up vs fp32 (paired)", "cosine to fp32")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"{args.model} at {pre.input_size[1]} px, ORT CPU, {args.threads} threads, "
        f"{args.runs} interleaved rounds"
    )
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))

    def ratio(name: str, base: str, b: str) -> float:
        return results[base]["latency"][b]["p50_ms"] / results[name]["latency"][b]["p50_ms"]

    summary = {
        b: {
            "ours_vs_fp32": results["ours_w8a8"]["latency"][b]["speedup"]["ratio"],
            "ours_vs_quantize_static": ratio("ours_w8a8", "ort_quantize_static", b),
            "w4a4_twin_vs_uniform": ratio("ours_w4a4_twin", "ours_w4a4", b),
        }
        for b in results["ours_w8a8"]["latency"]
    }
    print("summary:", json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(
        args.out,
        {
            "model": args.model,
            "threads": args.threads,
            "results": results,
            "summary": summary,
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
