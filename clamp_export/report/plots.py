"""The report's pictures, drawn by matplotlib from ``report.json`` (and ``search.json``) alone.

Each function returns PNG bytes, or None when the report holds nothing to draw, so report.html
can be rebuilt from the files of a run directory.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit: the report is drawn anywhere
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def latency_vs_batch(report: dict) -> bytes | None:
    lat = report.get("latency") or {}
    if not lat:
        return None
    batches = sorted(lat, key=int)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in lat[batches[0]]:
        ax.plot(
            [int(b) for b in batches], [lat[b][name]["p50_ms"] for b in batches], "o-", label=name
        )
        ax2.plot(
            [int(b) for b in batches],
            [lat[b][name]["images_per_s"] for b in batches],
            "o-",
            label=name,
        )
    for a, label in ((ax, "p50 latency (ms)"), (ax2, "throughput (images/s)")):
        a.set_xscale("log", base=2)
        a.set_xticks([int(b) for b in batches], batches)
        a.minorticks_off()
        a.set_yscale("log")
        a.set_xlabel("batch")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _png(fig)


def error_histogram(report: dict) -> bytes | None:
    hists = {
        n: b["error_histogram"] for n, b in report["backends"].items() if b.get("error_histogram")
    }
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, h in hists.items():
        edges = h["edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.step(centres, [max(c, 0.5) for c in h["counts"]], where="mid", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"|logit - {report['reference']} logit|")
    ax.set_ylabel("logits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def per_block_error(report: dict) -> bytes | None:
    blocks = report.get("per_block") or {}
    if not blocks:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, values in blocks.items():
        ax.plot(range(len(values)), values, "o-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("relative error of the block output")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def confusion(report: dict) -> bytes | None:
    c = report.get("confusion")
    if not c:
        return None
    m = c["matrix"]
    n = len(m)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    rows = [[v / max(sum(r), 1) for v in r] for r in m]
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), c["classes"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), c["classes"], fontsize=7)
    ax.set_xlabel(f"predicted by {c['backend']}")
    ax.set_ylabel("label")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the label's images")
    return _png(fig)


def fitness_curve(search: dict | None) -> bytes | None:
    if not search or not search.get("layers"):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    layers = search["layers"]
    ax.plot(range(len(layers)), [r["after"] for r in layers], lw=1)
    ax.set_xlabel("layer searched (passes one after another)")
    ax.set_ylabel("fitness after the layer (lower is better)")
    ax.grid(alpha=0.3)
    return _png(fig)


def bits_per_layer(report: dict) -> bytes | None:
    mixed = report.get("mixed_precision")
    if not mixed:
        return None
    names = list(mixed["weight_bits"])
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names)), 3.2))
    ax.bar(range(len(names)), [mixed["weight_bits"][n] for n in names])
    ax.set_xticks(
        range(len(names)), [n.removeprefix("blocks.") for n in names], rotation=90, fontsize=6
    )
    ax.set_ylabel("weight bits")
    ax.set_title(f"average {mixed['avg_weight_bits']:.2f} bits, {mixed['packed_mb']:.3f} MB packed")
    return _png(fig)
