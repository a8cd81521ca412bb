"""Shared pieces of the accuracy benchmarks: evaluation, mean ± std, table printing."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn


@torch.inference_mode()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_pct(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def calibration_images(loaded, source: str, n: int, seed: int, synth_preset: str = "default"):
    """(normalized images, generation stats) for a calibration source.

    ``source`` is ``real`` (n random Fashion-MNIST training images) or a Stage 1 method.
    """
    import time

    from clamp_export.data.sources import load_images
    from clamp_export.synth import preset, synthesize

    if source == "real":
        images, _ = load_images("fmnist-train", loaded.preprocess, limit=n, seed=seed, shuffle=True)
        return images, {"seconds": 0.0, "misprediction_rate": None}
    t = time.time()
    res, _ = synthesize(
        loaded,
        preset(synth_preset, method=source, n=n, seed=seed),
        None,
        log=lambda m: None,
        progress=False,
    )
    return res.images, {"seconds": time.time() - t, "misprediction_rate": res.misprediction_rate}


def base_parser(doc: str, bits: tuple[str, ...], out: Path) -> argparse.ArgumentParser:
    """Flags every accuracy benchmark takes: model, seeds, ladder, targets, images, output."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default=",".join(bits))
    ap.add_argument("--targets", default="ort,trt")
    ap.add_argument("--n", type=int, default=32, help="calibration images")
    ap.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only")
    ap.add_argument("--out", type=Path, default=out)
    return ap
