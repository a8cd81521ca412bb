"""The report stage: every backend against the fake-quant model, accuracy and latency (DESIGN §8).

Inputs are files of a run directory (``qparams.json``, the QDQ and FP32 graphs, the engine record)
and the evaluation images; outputs are ``report.json`` (schema-versioned), ``report.md`` (the
tables, for CI job summaries) and the terminal summary, which prints the same tables.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clamp_export.data.sources import noise_images
from clamp_export.models import LoadedModel
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.fakequant import quantizers
from clamp_export.quant.targets import TargetProfile
from clamp_export.report.blocks import per_block
from clamp_export.report.gates import Gates, evaluate
from clamp_export.report.latency import Timing, time_interleaved
from clamp_export.report.outputs import backend_outputs
from clamp_export.report.parity import logit_error, top1_accuracy, top1_agreement
from clamp_export.report.trtexec import gpu_compute
from clamp_export.runtime.backends import DEFAULT_BACKENDS, Artifacts, open_backends
from clamp_export.search.mixed import summarize
from clamp_export.versions import versions

REPORT, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
REPORT_SCHEMA = 2
PARITY_NOISE_IMAGES = 64
REFERENCE = "torch-fakequant"  # what every deployed backend is compared with
DEPLOYED = ("trt", "ort-trt", "ort-cuda", "ort-qdq")  # what stands for the deployment, first found


@dataclass(frozen=True)
class ReportOptions:
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    asked: bool = False  # the backends were named: one that cannot run is an error, not a skip
    batches: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None
    device: str = "cpu"
    gates: Gates = field(default_factory=Gates)
    timing: Timing = field(default_factory=Timing)
    store: Path | str | None = (
        None  # reuse backend outputs stored here (report.outputs); None: run all
    )
    engine_cache: str | None = None  # the run's folder for ort-trt's TensorRT EP engines


def machine(threads: int | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report_stage(
    loaded: LoadedModel,
    qmodel: nn.Module,
    bits: BitsSpec,
    profile: TargetProfile,
    graphs: dict[str, Path],
    *,
    eval_x: torch.Tensor | None,
    eval_y: torch.Tensor | None,
    eval_source: str | None,
    engines: dict[str, tuple[Path, dict]],
    seed: int,
    config: dict,
    options: ReportOptions = ReportOptions(),
    log=print,
) -> dict:
    """The report of one run directory; ``graphs`` holds its "qdq" and "float" ONNX files."""
    if options.threads:
        torch.set_num_threads(options.threads)
    x = (
        eval_x
        if eval_x is not None
        else noise_images(PARITY_NOISE_IMAGES, loaded.preprocess, seed + 1)
    )
    artifacts = Artifacts(
        loaded.model,
        qmodel,
        graphs["float"],
        graphs["qdq"],
        options.device,
        options.threads,
        engines,
        Path(options.engine_cache) if options.engine_cache else None,
    )
    records = {name: record for name, (_, record) in engines.items()}
    ready, skipped = open_backends((REFERENCE, *options.backends), options.asked, artifacts)
    for name, why in skipped.items():
        log(f"skipping backend {name}: {why}")
    log(
        f"parity of {', '.join(ready)} on {len(x)} {'eval' if eval_x is not None else 'noise'} images"
    )
    logits, reused = backend_outputs(ready, x, graphs, loaded.name, options, log)
    if reused:
        log(f"reusing stored outputs of {', '.join(reused)} (same graphs, images and runtimes)")
    ref = logits[REFERENCE]
    backends = {}
    for name, out in logits.items():
        backends[name] = {
            "top1": None if eval_y is None else top1_accuracy(out, eval_y),
            "agreement": top1_agreement(out, ref),
            "logit_error": logit_error(out, ref).to_dict(),
            "error_histogram": None if name == REFERENCE else error_histogram(out, ref),
        }
    latency = {}
    for b in options.batches:
        log(f"timing {len(ready)} backends interleaved at batch {b}")
        xb = noise_images(b, loaded.preprocess, seed + 2)
        latency[str(b)] = time_interleaved(ready, b, xb, options.timing)
        for name in ("trt", "trt-fp16"):  # GPU compute beside host time, where trtexec is
            if name in ready:
                shape = (b, *loaded.preprocess.input_size)
                got = gpu_compute(engines[name][0], "input", shape, options.timing.min_seconds)
                if got is not None:
                    latency[str(b)][name]["trtexec"] = got
    report = {
        "schema": REPORT_SCHEMA,
        "model": loaded.name,
        "bits": str(bits),
        "target": profile.name,
        "parity_inputs": {
            "source": eval_source or "noise",
            "count": len(x),
            "labelled": eval_y is not None,
        },
        "reference": REFERENCE,
        "backends": backends,
        "reused_outputs": reused,
        "skipped": skipped,
        "latency": latency,
        "latency_setup": {**machine(options.threads), "timing": options.timing.__dict__},
        "sizes": {
            "fp32_onnx_bytes": graphs["float"].stat().st_size,
            "qdq_onnx_bytes": graphs["qdq"].stat().st_size,
            "engine_bytes": records.get("trt", {}).get("plan_bytes"),
            "fp16_engine_bytes": records.get("trt-fp16", {}).get("plan_bytes"),
            "packed_mb": summarize(qmodel, profile).packed_mb if bits.mixed else None,
        },
        "artifacts": {"engine": records.get("trt"), "fp16_engine": records.get("trt-fp16")},
        "per_block": per_block(loaded.model, qmodel, graphs["qdq"], x),
        "confusion": _confusion(logits, eval_y, eval_source),
        "mixed_precision": _mixed_summary(qmodel, profile) if bits.mixed else None,
        "notes": [
            *loaded.notes,
            *_reuse_note(reused),
            *_notes(bits, profile.name, qmodel),
        ],
        "config": config,
        "versions": versions(),
        "seconds": None,
    }
    report["gates"] = [g.__dict__ for g in evaluate(options.gates, report)]
    return report


def _reuse_note(reused: dict[str, str]) -> list[str]:
    if not reused:
        return []
    return [
        f"Outputs of {', '.join(reused)} on the eval images were read from the store: the same "
        "graph bytes, images, runtime versions and threads gave them before (latency is measured "
        "afresh; --no-cache recomputes them)."
    ]


def _mixed_summary(qmodel, profile) -> dict:
    a = summarize(qmodel, profile)
    return {
        "avg_weight_bits": a.avg_weight_bits,
        "avg_act_bits": a.avg_act_bits,
        "packed_mb": a.packed_mb,
        "weight_bits": a.weight_bits,
        "act_bits": a.act_bits,
    }


def _notes(bits: BitsSpec, target: str, qmodel: nn.Module) -> list[str]:
    notes = []
    if target == "trt":
        notes.append(
            "The trt fake-quant model computes in its FP16 graph's arithmetic: every op's result "
            "is rounded to FP16 where the graph stores it, and every matmul and conv between "
            "quant points sums its integer levels exactly, as TensorRT's INT8 kernels do. "
            "ort-qdq runs that graph with the rounding explicit and those products on "
            "MatMulInteger / ConvInteger, as ONNX Runtime's CPU EP would otherwise compute most "
            "of it in FP32; its CPU latency is therefore no deployment figure."
        )
    twin = any(q.twin for _, _, q in quantizers(qmodel))
    blocks = sorted({q.block for _, _, q in quantizers(qmodel) if q.block})
    if twin:
        notes.append(
            "The softmax output has twin-uniform levels: the graph splits it into a fine and a "
            "coarse part, each Q/DQ'd and multiplied by v in an INT8 matmul of its own (one extra "
            "attention-sized matmul per block)."
        )
    if bits.weight_only:
        notes.append(
            f"INT4 weight-only: the qkv/proj/fc1/fc2 weights are int4 in blocks of "
            f"{'/'.join(map(str, blocks))} "
            "input channels (one FP16 scale each, zero-point 0), dequantized to FP16 by opset-21 "
            "DequantizeLinear; activations, the patch embedding and the head stay FP16."
        )
    if bits.mixed:
        notes.append(
            "Mixed precision: weights below 8 bits are stored in int8 containers (the ONNX holds "
            "1 byte per weight); packed_mb is the size if they were packed at their widths."
        )
        return notes
    if target == "trt" and bits.weight < 8:
        notes.append(
            f"TensorRT has no INT{bits.weight}xINT8 kernel: W{bits.weight} weights run as INT8 "
            f"kernels holding {bits.weight}-bit values (accuracy of W{bits.weight}, speed of W8)."
        )
    if bits.act < 8:
        notes.append(
            f"A{bits.act} activations are enforced by Clip before int8 Q; both targets run INT8 "
            "kernels, so they change accuracy, not speed."
            + (
                f" On trt the Clip keeps a window of {2**bits.act} int8 levels that may sit "
                "off-centre (zero-point stays 0), so one-sided tensors keep all their levels."
                if target == "trt"
                else ""
            )
        )
    return notes


def error_histogram(out: torch.Tensor, ref: torch.Tensor, bins: int = 40) -> dict:
    """Counts of |out - ref| over log-spaced bins (errors below 1e-6 in the first)."""
    diff = (out - ref).abs().flatten().double().clamp_min(1e-6)
    hi = max(float(diff.max()) * 1.0001, 2e-6)
    edges = torch.logspace(-6, torch.log10(torch.tensor(hi)).item(), bins + 1, dtype=torch.float64)
    counts = torch.histogram(diff, bins=edges).hist
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts]}


def _confusion(logits: dict, labels: torch.Tensor | None, source: str | None) -> dict | None:
    """The deployed graph's confusion matrix, for labelled data of at most 50 classes."""
    name = "ort-qdq" if "ort-qdq" in logits else REFERENCE
    if labels is None:
        return None
    n = int(logits[name].shape[1])
    if n > 50:
        return None
    from clamp_export.data.fashion_mnist import CLASSES

    pred = logits[name].argmax(1)
    matrix = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
    fmnist = source is not None and source.startswith("fmnist") and n == len(CLASSES)
    classes = list(CLASSES) if fmnist else [str(i) for i in range(n)]
    return {"backend": name, "classes": classes, "matrix": matrix.tolist()}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def tables(report: dict) -> list[tuple[str, list[tuple[str, ...]]]]:
    """(title, rows with a header first) for the terminal and report.md alike."""
    acc = [
        ("backend", "top-1", "drop vs FP32", "agree vs FQ", "max|Δ|", "mean|Δ|", "p99|Δ|", "cosine")
    ]
    fp32 = report["backends"].get("torch-fp32", {}).get("top1")
    for name, b in report["backends"].items():
        e = b["logit_error"]
        ref = name == report["reference"]
        drop = "-" if b["top1"] is None or fp32 is None else f"{100 * (fp32 - b['top1']):+.2f}"
        acc.append(
            (
                name,
                pct(b["top1"]),
                drop,
                "ref" if ref else pct(b["agreement"]),
                "" if ref else f"{e['max_abs']:.3g}",
                "" if ref else f"{e['mean_abs']:.3g}",
                "" if ref else f"{e['p99_abs']:.3g}",
                "" if ref else f"{e['cosine']:.6f}",
            )
        )
    lat = [("batch", "backend", "p50 ms", "p90 ms", "p99 ms", "images/s", "speed-up", "GPU ms")]
    for batch, per in report["latency"].items():
        for name, t in per.items():
            up = t.get("speedup")
            gpu = t.get("trtexec") or {}
            lat.append(
                (
                    batch,
                    name,
                    f"{t['p50_ms']:.2f}",
                    f"{t['p90_ms']:.2f}",
                    f"{t['p99_ms']:.2f}",
                    f"{t['images_per_s']:.0f}",
                    f"{up['ratio']:.2f}x vs {up['over']}" if up else "",
                    f"{gpu['gpu_compute_p50_ms']:.3f}" if "gpu_compute_p50_ms" in gpu else "",
                )
            )
    if not any(row[-1] for row in lat[1:]):  # trtexec's GPU compute time, where it ran
        lat = [row[:-1] for row in lat]
    out = [("accuracy and parity", acc)]
    engines = _engine_rows(report.get("artifacts", {}))
    if len(engines) > 1:
        out.append(("engines", engines))
    if len(lat) > 1:
        setup = report["latency_setup"]
        out.append((f"latency ({setup['cpu']}, {setup['threads']} threads, interleaved)", lat))
    if report["gates"]:
        gates = [("gate", "result", "measured")]
        gates += [
            (g["name"], "pass" if g["passed"] else "FAIL", g["message"]) for g in report["gates"]
        ]
        out.append(("gates", gates))
    return out


def _engine_rows(artifacts: dict) -> list[tuple[str, ...]]:
    """The engines built: by what, for what, how big, and how many layers run in each precision
    (from the engine inspector, which needs a GPU)."""
    rows = [("engine", "built by", "for", "MB", "build s", "layers by precision")]
    for key, name in (("engine", "model.engine"), ("fp16_engine", "model.fp16.engine")):
        r = artifacts.get(key)
        if not r:
            continue
        target = r.get("target") or {}
        built = target.get("built_on_gpu") or {}
        caps = target.get("compute_capabilities")
        where = ", ".join(caps) if isinstance(caps, list) else caps or built.get("name", "-")
        layers = (r.get("layers") or {}).get("counts")
        shown = ", ".join(f"{k} {v}" for k, v in layers.items()) if layers else "needs a GPU"
        rows.append(
            (
                name,
                f"{r.get('module')} {r.get('version')}",
                str(where),
                f"{r.get('plan_bytes', 0) / 1e6:.2f}",
                str(r.get("build_seconds", "-")),
                shown,
            )
        )
    return rows


def _head(report: dict) -> str:
    p = report["parity_inputs"]
    return f"{report['model']} {report['bits']} → {report['target']} ({p['count']} {p['source']} images)"


def summary_table(report: dict) -> str:
    lines = [_head(report)]
    for title, rows in tables(report):
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines += ["", title, fmt[0], "  ".join("-" * w for w in widths), *fmt[1:]]
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join([*lines, *(f"note: {n}" for n in report["notes"])])


def markdown(report: dict) -> str:
    """report.md: the same tables as GitHub-flavoured Markdown (a CI job summary renders it)."""
    lines = [f"## {_head(report)}"]
    for title, rows in tables(report):
        cells = [[c.replace("|", "\\|") for c in r] for r in rows]
        lines += ["", f"**{title}**", "", "| " + " | ".join(cells[0]) + " |"]
        lines += ["|" + "---|" * len(cells[0]), *("| " + " | ".join(r) + " |" for r in cells[1:])]
    lines += ["", *(f"- skipped `{name}`: {why}" for name, why in report["skipped"].items())]
    lines += [*(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"
