"""The report stage: parity of the deployed graph against the fake-quant model (DESIGN §8).

Inputs are files of a run directory (``qparams.json``, ``model.qdq.onnx``, the engine record) and
the evaluation images; the output is ``report.json`` and the terminal summary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clamp_export.data.sources import noise_images
from clamp_export.models import LoadedModel
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.fakequant import quantizers
from clamp_export.quant.targets import TargetProfile
from clamp_export.report.parity import logit_error, top1_accuracy, top1_agreement
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from clamp_export.search.mixed import summarize
from clamp_export.versions import versions

REPORT = "report.json"
PARITY_NOISE_IMAGES = 64


def report_stage(
    loaded: LoadedModel,
    qmodel: nn.Module,
    bits: BitsSpec,
    profile: TargetProfile,
    onnx_path: Path,
    *,
    eval_x: torch.Tensor | None,
    eval_y: torch.Tensor | None,
    eval_source: str | None,
    engine: dict | None,
    seed: int,
    config: dict,
    log=print,
) -> dict:
    """The report of one run directory's artifacts; ``onnx_path`` names the deployed graph."""
    x = (
        eval_x
        if eval_x is not None
        else noise_images(PARITY_NOISE_IMAGES, loaded.preprocess, seed + 1)
    )
    log(f"parity on {len(x)} {'eval' if eval_x is not None else 'noise'} images")
    fp32 = TorchRunner(loaded.model, "fp32")(x)
    fq = TorchRunner(qmodel, "fakequant")(x)
    ort_logits = OrtRunner(onnx_path)(x)
    report = {
        "model": loaded.name,
        "bits": str(bits),
        "target": profile.name,
        "parity_inputs": {"source": eval_source or "noise", "count": len(x)},
        "accuracy": None,
        "agreement": {
            "ort": top1_agreement(ort_logits, fq),
            "fakequant_vs_fp32": top1_agreement(fq, fp32),
        },
        "logit_error": {"ort": logit_error(ort_logits, fq).to_dict()},
        "artifacts": {
            "onnx": onnx_path.name,
            "onnx_bytes": onnx_path.stat().st_size,
            "engine": engine,
        },
        "mixed_precision": _mixed_summary(qmodel, profile) if bits.mixed else None,
        "notes": [
            *loaded.notes,
            *_notes(bits, profile.name, any(q.twin for _, _, q in quantizers(qmodel))),
        ],
        "config": config,
        "versions": versions(),
        "seconds": None,
    }
    if eval_y is not None:
        report["accuracy"] = {
            "fp32": top1_accuracy(fp32, eval_y),
            "fakequant": top1_accuracy(fq, eval_y),
            "ort": top1_accuracy(ort_logits, eval_y),
        }
    return report


def _mixed_summary(qmodel, profile) -> dict:
    a = summarize(qmodel, profile)
    return {
        "avg_weight_bits": a.avg_weight_bits,
        "avg_act_bits": a.avg_act_bits,
        "packed_mb": a.packed_mb,
        "weight_bits": a.weight_bits,
        "act_bits": a.act_bits,
    }


def _notes(bits: BitsSpec, target: str, twin: bool = False) -> list[str]:
    notes = []
    if twin:
        notes.append(
            "The softmax output has twin-uniform levels: the graph splits it into a fine and a "
            "coarse part, each Q/DQ'd and multiplied by v in an INT8 matmul of its own (one extra "
            "attention-sized matmul per block)."
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


def summary_table(report: dict) -> str:
    rows = [("backend", "top-1", "agree vs FQ", "max|Δ|", "mean|Δ|", "cosine")]
    acc = report.get("accuracy") or {}
    err = report["logit_error"]["ort"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    rows.append(
        (
            "torch fp32",
            pct(acc.get("fp32")),
            pct(report["agreement"]["fakequant_vs_fp32"]),
            "",
            "",
            "",
        )
    )
    rows.append(("torch fake-quant", pct(acc.get("fakequant")), "ref", "", "", ""))
    rows.append(
        (
            "onnxruntime",
            pct(acc.get("ort")),
            pct(report["agreement"]["ort"]),
            f"{err['max_abs']:.3g}",
            f"{err['mean_abs']:.3g}",
            f"{err['cosine']:.6f}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = f"{report['model']} {report['bits']} → {report['target']} ({report['parity_inputs']['count']} {report['parity_inputs']['source']} images)"
    return "\n".join([head, *lines, *(f"note: {n}" for n in report["notes"])])
