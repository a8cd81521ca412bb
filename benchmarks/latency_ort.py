"""ORT CPU latency: FP32 vs our QDQ graphs (ort profile) vs ORT's own quantize_static.

Our graphs: W8A8, and W4A4 with uniform and with twin-uniform softmax levels (the twin adds a
Where and a second ``attn @ v`` matmul per block: what it costs is measured here, on the CPU).

DeiT-S at 224 px with random weights (no hub access here; latency does not depend on the values).
Pinned threads, warm-up, then the median of N runs per batch size. Accuracy is the cosine of
each quantized graph's logits to FP32 on the same Gaussian inputs (random weights give no top-1).

    .venv/bin/python benchmarks/latency_ort.py [--model deit_s] [--threads 2] [--runs 20]

Prints a table and writes benchmarks/results/latency_ort.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from clamp_export import atomic
from clamp_export.data.sources import noise_images
from clamp_export.export.qdq import export_qdq
from clamp_export.models import load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.report.parity import logit_error
from clamp_export.runtime.runners import OrtRunner
from clamp_export.versions import versions

RESULTS = Path(__file__).resolve().parent / "results"
OURS = {  # graph name -> (bits, softmax levels)
    "ours_w8a8": ("w8a8", "uniform"),
    "ours_w4a4": ("w4a4", "uniform"),
    "ours_w4a4_twin": ("w4a4", "twin"),
}


def export_fp32(model: torch.nn.Module, input_size, path: Path) -> None:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_size),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.save(onnx.load_from_string(buf.getvalue()), str(path))


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


def time_runner(runner: OrtRunner, x: np.ndarray, runs: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        runner.run_batch(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner.run_batch(x)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "min_ms": times[0],
        "runs": runs,
    }


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
        export_fp32(loaded.model, pre.input_size, graphs["fp32"])
        profile = get_profile("ort")
        for name, (bits, softmax) in OURS.items():
            qm = wrap_model(loaded.model, BitsSpec.parse(bits), profile, softmax)
            graphs[name] = tmp / f"{name}.onnx"
            export_qdq(calibrate(qm, calib), pre.input_size, profile, graphs[name])
        graphs["ort_quantize_static"] = tmp / "qs.onnx"
        ort_quantize_static(graphs["fp32"], graphs["ort_quantize_static"], calib.numpy())

        runners = {k: OrtRunner(p, k, threads=args.threads) for k, p in graphs.items()}
        fp32_logits = runners["fp32"](probe)
        results = {}
        for name, runner in runners.items():
            err = logit_error(runner(probe), fp32_logits)
            results[name] = {
                "cosine_to_fp32": err.cosine,
                "bytes": graphs[name].stat().st_size,
                "latency": {},
            }
            for b in (int(v) for v in args.batches.split(",")):
                x = noise_images(b, pre, seed=2).numpy()
                results[name]["latency"][str(b)] = time_runner(runner, x, args.runs)

    rows = []
    for name, r in results.items():
        for b, t in r["latency"].items():
            base = results["fp32"]["latency"][b]["median_ms"]
            rows.append(
                (
                    name,
                    b,
                    f"{t['median_ms']:.1f}",
                    f"{t['p90_ms']:.1f}",
                    f"{base / t['median_ms']:.2f}x",
                    f"{r['cosine_to_fp32']:.5f}",
                )
            )
    header = ("graph", "batch", "median ms", "p90 ms", "speed-up vs fp32", "cosine to fp32")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(
        f"{args.model} at {pre.input_size[1]} px, ORT CPU, {args.threads} threads, median of {args.runs} runs"
    )
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    ours, qs = results["ours_w8a8"]["latency"], results["ort_quantize_static"]["latency"]
    uniform, twin = results["ours_w4a4"]["latency"], results["ours_w4a4_twin"]["latency"]
    summary = {
        b: {
            "ours_vs_fp32": results["fp32"]["latency"][b]["median_ms"] / ours[b]["median_ms"],
            "ours_vs_quantize_static": qs[b]["median_ms"] / ours[b]["median_ms"],
            "w4a4_twin_vs_uniform": twin[b]["median_ms"] / uniform[b]["median_ms"],
        }
        for b in ours
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
