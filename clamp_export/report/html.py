"""report.html: one self-contained page (no network, pictures as PNG data URIs) for a person.

It shows first the verdict of the gates, then the tables of report.md, then the pictures:
latency against batch size, the logit-error histogram, the per-block error, the confusion
matrix, the Stage 1 images, the search's fitness curve and, for mixed precision, bits per layer.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from clamp_export.report import plots

_CAPTIONS = {
    "latency": (
        "Latency and throughput against batch size",
        "p50 of interleaved runs; each quantized backend sits beside its float baseline.",
    ),
    "errors": (
        "Logit error against the fake-quant model",
        "How far each backend's logits are from the model it claims to deploy.",
    ),
    "blocks": (
        "Per-block error",
        "Relative error of each transformer block's output: where quantization departs from float, "
        "and where the deployed graph departs from the fake-quant model.",
    ),
    "confusion": ("Confusion matrix", "Rows are labels, normalized per label."),
    "grid": ("Stage 1 images", "The synthetic calibration images, un-normalized."),
    "fitness": ("Search fitness", "The Stage 2 fitness after each layer's search."),
    "bits": ("Bits per layer", "The weight widths the mixed-precision search chose."),
}


def _verdict(report: dict) -> dict:
    gates = report["gates"]
    failed = [g for g in gates if not g["passed"]]
    if not gates:
        return {"css": "none", "text": "No gates were set: the figures below are for reading."}
    if failed:
        names = ", ".join(g["name"] for g in failed)
        return {
            "css": "fail",
            "text": f"FAIL: {len(failed)} of {len(gates)} gates failed ({names})",
        }
    return {"css": "pass", "text": f"PASS: all {len(gates)} gates hold"}


def render(report: dict, search: dict | None = None, grid_png: bytes | None = None) -> str:
    from clamp_export.report.stage import _head, tables

    pictures = {
        "latency": plots.latency_vs_batch(report),
        "errors": plots.error_histogram(report),
        "blocks": plots.per_block_error(report),
        "confusion": plots.confusion(report),
        "grid": grid_png,
        "fitness": plots.fitness_curve(search),
        "bits": plots.bits_per_layer(report),
    }
    figures = [
        {
            "png": base64.b64encode(png).decode(),
            "title": _CAPTIONS[k][0],
            "caption": _CAPTIONS[k][1],
        }
        for k, png in pictures.items()
        if png
    ]
    env = Environment(
        loader=PackageLoader("clamp_export.report", "templates"), autoescape=select_autoescape()
    )
    return env.get_template("report.html.j2").render(
        report=report,
        head=_head(report),
        verdict=_verdict(report),
        tables=tables(report),
        figures=figures,
        config=json.dumps(report["config"], indent=1, default=str),
    )


def read_optional(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None
