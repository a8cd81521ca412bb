"""Shared pieces of the accuracy benchmarks: evaluation, mean ± std, table printing."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from clamp_export.quant.targets import get_profile

# The benchmarks' Stage 1 sets, committed: a fresh clone re-runs a cell on the very images it
# was measured with (a regenerated set can differ, and moves a W4A4 cell by a few tenths). A set
# a benchmark generates lands here too; commit it with the cells it produced.
REFERENCE_SETS = Path(__file__).resolve().parent.parent / "calib" / "reference"


@torch.inference_mode()
def predictions(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Small batches keep activations in cache: 10k fake-quant images in 11 s, not 46 s at 2000."""
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    return float((predictions(model, x, batch) == y).float().mean())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_pct(values: list[float], expected: int | None = None) -> str:
    """mean ± std in percent; says how many seeds when fewer than ``expected`` ran."""
    if not values:
        return "-"
    m, s = mean_std(values)
    more = f" (n={len(values)})" if expected and len(values) < expected else ""
    return f"{100 * m:.2f} ± {100 * s:.2f}{more}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, aligned for the terminal and ready to paste into docs/results.md."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(header))
    print(line("-" * w for w in widths))
    for r in rows:
        print(line(r))


def calibration_images(loaded, source: str, n: int, seed: int, synth_preset: str = "default"):
    """(normalized images, generation stats) for a calibration source.

    ``source`` is ``real`` (n random Fashion-MNIST training images) or a Stage 1 method.
    """
    from clamp_export.data.sources import load_images
    from clamp_export.synth import preset, synthesize

    if source == "real":
        images, _ = load_images("fmnist-train", loaded.preprocess, limit=n, seed=seed, shuffle=True)
        return images, {"seconds": 0.0, "misprediction_rate": None}
    t = time.time()
    # benchmarks share their sets and report the generation time a set took when it was made
    res, _ = synthesize(
        loaded,
        preset(synth_preset, method=source, n=n, seed=seed),
        REFERENCE_SETS,
        log=lambda m: None,
        progress=False,
    )
    seconds = res.seconds if res.cached else time.time() - t
    return res.images, {"seconds": seconds, "misprediction_rate": res.misprediction_rate}


def load_reference(args) -> tuple:
    """(loaded model, test images, test labels, FP32 top-1): the start of every accuracy benchmark."""
    from clamp_export.data.sources import load_images
    from clamp_export.models import load_model

    loaded = load_model(args.model)
    x_test, y_test = load_images("fmnist", loaded.preprocess, limit=args.eval_limit)
    fp32 = top1(loaded.model, x_test, y_test)
    print(f"{args.model} FP32 top-1 on {len(x_test)} test images: {100 * fp32:.2f}%", flush=True)
    return loaded, x_test, y_test, fp32


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
    ap.add_argument("--synth-preset", default="default", help="Stage 1 preset")
    ap.add_argument("--eval-limit", type=int, help="evaluate on the first N test images only")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument(
        "--cells",
        type=Path,
        default=out.parent / "cells.jsonl",
        help="per-cell results shared by the benchmarks (reused unless --fresh)",
    )
    ap.add_argument("--fresh", action="store_true", help="recompute every cell")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="compute nothing: tabulate the cells already stored ('-' where none)",
    )
    return ap


class Cells:
    """Benchmark results, one JSON line per cell, keyed by everything that decides the number.

    The Stage 1 and Stage 2 benchmarks share their baseline cells through one file, and a sweep
    that is stopped resumes where it left off. A line cut short by a kill is skipped on reading.
    Changing the code does not change a key: pass ``--fresh`` after such a change.
    """

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        self.records: dict[str, dict] = {}
        if path.is_file() and not fresh:
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.records[json.dumps(rec["key"], sort_keys=True)] = rec["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def has(self, key: dict) -> bool:
        return json.dumps(key, sort_keys=True) in self.records

    def get_or_run(self, key: dict, run) -> dict:
        k = json.dumps(key, sort_keys=True)
        if k not in self.records:
            self.records[k] = run()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": self.records[k]}, sort_keys=True) + "\n")
        return self.records[k]


def searchable_model(
    loaded, bits: str, target: str, calib, rng: str, search=None, softmax: str = "uniform"
):
    """(float reference, calibrated fake-quant model): where a search on ``calib`` starts.

    ``search`` (a SearchConfig) decides the equalization; mixed precision allocates bits with the
    search fitness on the same images, for every method, so baselines and CLAMP compare at the
    same allocation procedure.
    """
    from clamp_export.quant.bits import BitsSpec
    from clamp_export.quant.calibrate import calibrate
    from clamp_export.quant.fakequant import wrap_model
    from clamp_export.quant.targets import get_profile
    from clamp_export.search import prepare_equalization, preset
    from clamp_export.search.mixed import allocate_bits

    spec, profile = BitsSpec.parse(bits), get_profile(target)
    qm = wrap_model(loaded.model, spec, profile, softmax)
    fp = loaded.model if search is None else prepare_equalization(loaded.model, qm, calib, search)
    calibrate(qm, calib, rng)
    if spec.mixed:
        allocate_bits(spec, fp, qm, calib, search or preset("default"), profile)
    return fp, qm


def quantized_model(
    loaded, bits: str, target: str, calib, rng: str, search=None, softmax: str = "uniform"
):
    """Calibrated fake-quant model; ``search`` (a SearchConfig) runs Stage 2 on ``calib``."""
    from clamp_export.search import run_search

    fp, qm = searchable_model(loaded, bits, target, calib, rng, search, softmax)
    if search is not None:
        header = {"model": loaded.name, "target": target, "bits": bits}
        run_search(fp, qm, calib, search, header, loaded.preprocess.pixel_bounds(), progress=False)
    return qm


def cell_key(
    loaded,
    x_test,
    args,
    seed: int,
    source: str,
    target: str,
    bits: str,
    method: str,
    search=None,
    softmax: str = "uniform",
) -> dict:
    """Everything that decides a cell's number (``search``: the Stage 2 config, if any)."""
    key = {
        "model": loaded.name,
        "weights_sha256": loaded.weights_sha256,
        "eval_images": len(x_test),
        "n": args.n,
        "seed": seed,
        "source": source,
        "synth_preset": args.synth_preset,
        "target": target,
        "profile": get_profile(target).to_dict(),  # the numerics the target runs
        "bits": bits,
        "method": method,
    }
    if softmax != "uniform":  # keys of cells measured before the option are unchanged
        key["softmax"] = softmax
    if key["profile"]["float_dtype"] == "float16":  # FP16 arithmetic since SEARCH_NUMERICS 2,
        key["arithmetic"] = "fp16-graph+int8-kernels"  # integer matmuls and conv since 3
    return key if search is None else {**key, "search": search.to_dict()}


def deployed_predictions(qm: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
    """Top-1 classes of ONNX Runtime on ``qm``'s exported QDQ graph: on ``trt`` the FP16 graph,
    run with its FP16 rounding explicit (``runtime.fp16_rounding``)."""
    import tempfile

    from clamp_export.export.qdq import export_qdq
    from clamp_export.runtime.runners import OrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.qdq.onnx"
        export_qdq(qm, tuple(x.shape[1:]), get_profile(target), path)
        return OrtRunner(path, threads=torch.get_num_threads())(x).argmax(1)


def evaluate_cell(cells: Cells, key: dict, build, x_test, y_test, deployed: bool = False) -> dict:
    """{top1, seconds} of the model ``build()`` returns (seconds = building it, not evaluating);
    ``deployed`` adds ``ort_top1`` and ``agreement`` of its exported graph (cells stored before
    the option hold neither)."""

    def run() -> dict:
        t = time.time()
        qm = build()
        seconds = time.time() - t
        pred = predictions(qm, x_test)
        rec = {"top1": float((pred == y_test).float().mean()), "seconds": seconds}
        if deployed:
            ort_pred = deployed_predictions(qm, key["target"], x_test)
            rec["ort_top1"] = float((ort_pred == y_test).float().mean())
            rec["agreement"] = float((ort_pred == pred).float().mean())
        return rec

    return cells.get_or_run(key, run)
