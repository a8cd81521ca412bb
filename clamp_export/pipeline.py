"""The whole run behind ``clamp-export MODEL``: load → calibrate → qparams.json → QDQ ONNX →
lint → (TensorRT build) → parity report. The CLI only parses flags into a ``RunConfig``."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clamp_export import __version__, atomic
from clamp_export.build import trt as trt_build
from clamp_export.data.sources import load_images, noise_images
from clamp_export.device import compute_device
from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models import LoadedModel, load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import RANGE_METHODS, calibrate
from clamp_export.quant.fakequant import collect_qparams, load_qparams, quantizers, wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import TargetProfile, get_profile
from clamp_export.report.parity import logit_error, top1_accuracy, top1_agreement
from clamp_export.rundir import CHECKPOINT, RunDir
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from clamp_export.search import SearchConfig, prepare_equalization, run_search, write_search_json
from clamp_export.search import preset as search_preset
from clamp_export.search.driver import load_checkpoint, search_identity
from clamp_export.search.mixed import allocate_bits, summarize
from clamp_export.synth import SynthConfig, preset, synthesize
from clamp_export.synth.generator import check_memory

CALIB_SOURCES = ("clamp", "noise", "real", "clamp-synth", "psaq")
# --calib clamp = Stage 1 (clamp images) + Stage 2 (search); the others are min-max/percentile
SYNTH_METHOD = {"clamp": "clamp", "noise": "noise", "clamp-synth": "clamp", "psaq": "psaq"}
PARITY_NOISE_IMAGES = 64


@dataclass
class RunConfig:
    model: str
    bits: str | None = None  # None: w8a8, or mixed precision under budget_mb
    target: str = "ort"
    weights: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    model_args: dict = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    random_init: bool = False  # memory and speed checks without weights
    calib: str = "clamp"
    calib_data: str = "fmnist-train"
    calib_size: int = 32
    synth_preset: str = "default"
    search_preset: str = "default"
    search_overrides: dict = field(default_factory=dict)  # e.g. cyclic=False, fitness="output"
    resume: bool = False
    budget_mb: float | None = None  # mixed precision under a model-size budget
    cache_dir: str | None = "calib"
    range_method: str = "minmax"
    softmax: str = "uniform"  # levels of the softmax output: uniform or twin (fakequant.wrap_model)
    percentile: float = 99.99
    qparams: str | None = None  # reuse a qparams.json instead of calibrating
    eval_data: str | None = None
    eval_limit: int | None = None
    out: str = "out"
    seed: int = 0
    build_engine: bool = True
    device: str = "cpu"  # where Stage 1 and Stage 2 run; export and parity run on the CPU


def versions() -> dict:
    import onnx
    import onnxruntime
    import timm

    v = {
        "clamp_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    trt_name = trt_build.available()
    if trt_name:
        v[trt_name] = getattr(trt_build.load_tensorrt(trt_name), "__version__", "?")
    return v


def _check(cfg: RunConfig) -> None:
    if cfg.calib not in CALIB_SOURCES:
        raise UserError(f"unknown --calib {cfg.calib!r}; choose one of: {', '.join(CALIB_SOURCES)}")
    if cfg.range_method not in RANGE_METHODS:
        raise UserError(
            f"unknown --range {cfg.range_method!r}; choose one of: {', '.join(RANGE_METHODS)}"
        )
    if not 50 < cfg.percentile <= 100:  # False for NaN too
        raise UserError(f"--percentile must lie in (50, 100], got {cfg.percentile}")
    if cfg.calib_size < 1:
        raise UserError("--calib-size must be at least 1")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise UserError("--eval-limit must be at least 1")
    if cfg.budget_mb is not None and not (math.isfinite(cfg.budget_mb) and cfg.budget_mb > 0):
        raise UserError(f"--budget-mb must be a positive number of MB, got {cfg.budget_mb}")
    if cfg.resume and (cfg.qparams or cfg.calib != "clamp"):
        raise UserError(
            "--resume continues a CLAMP search (--calib clamp); --qparams and the other --calib "
            "sources have none to continue"
        )
    if cfg.cache_dir:
        atomic.check_creatable_dir(cfg.cache_dir, "--cache-dir")
    atomic.check_creatable_dir(cfg.out, "--out")


def _bits(cfg: RunConfig) -> BitsSpec:
    """--bits, or under --budget-mb the mixed precision that the budget sets."""
    bits = BitsSpec.parse(cfg.bits or "w8a8")
    if cfg.budget_mb is None or bits.mixed:
        return bits
    if cfg.bits is not None:
        raise UserError(
            f"--budget-mb chooses the weight bits itself, so it contradicts --bits {cfg.bits}; "
            "drop --bits, or pass --bits mp:W[xA] to cap the averages as well"
        )
    return BitsSpec(weight=8, act=8, mp_weight=8.0)  # the budget sets the average weight bits


def _load_calibration_images(cfg: RunConfig, loaded) -> torch.Tensor | None:
    """Real calibration images (None for the synthetic sources), refused if too few or too many."""
    optimize = cfg.calib in ("clamp", "clamp-synth", "psaq")
    check_memory(loaded.model, loaded.preprocess, cfg.calib_size, optimize, "--calib-size")
    if cfg.calib != "real":
        return None
    x, _ = load_images(
        cfg.calib_data, loaded.preprocess, limit=cfg.calib_size, seed=cfg.seed, shuffle=True
    )
    if len(x) < cfg.calib_size:
        raise UserError(
            f"--calib-size {cfg.calib_size} but {cfg.calib_data} holds only {len(x)} images"
        )
    return x


def run(cfg: RunConfig, log=print) -> dict:
    """Run everything; returns the report (also written to OUT/report.json).

    Every input is checked before the long work starts, and the run writes into a staging
    folder that replaces the previous run's files only when it succeeds (``rundir.RunDir``).
    """
    t_start = time.time()
    _check(cfg)
    device = compute_device(cfg.device)  # refused before anything is loaded or written
    bits, profile = _bits(cfg), get_profile(cfg.target)
    torch.manual_seed(cfg.seed)
    loaded = load_model(
        cfg.model,
        weights=cfg.weights,
        num_classes=cfg.num_classes,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        model_args=cfg.model_args,
        mean=cfg.mean,
        std=cfg.std,
        random_init=cfg.random_init,
    )
    for note in loaded.notes:
        log(f"warning: {note}")
    pre = loaded.preprocess
    eval_x = eval_y = None
    if cfg.eval_data:
        eval_x, eval_y = load_images(cfg.eval_data, pre, limit=cfg.eval_limit)
        if eval_y is not None and int(eval_y.max()) >= loaded.model.num_classes:
            raise UserError(
                f"labels of {cfg.eval_data} go up to {int(eval_y.max())} but {loaded.name} has "
                f"{loaded.model.num_classes} classes"
            )
    loaded.model.to(device)
    qmodel = wrap_model(loaded.model, bits, profile, cfg.softmax)
    p = _Prepared(loaded, qmodel, bits, profile, device, eval_x, eval_y)
    if cfg.qparams:
        qp = QParams.load(cfg.qparams)
        if qp.bits != str(bits) and not bits.mixed:
            raise UserError(f"{cfg.qparams} holds {qp.bits} parameters but --bits is {bits}")
        qp.validate(profile)
        load_qparams(qmodel, qp)
        p.qparams = qp
    else:
        p.real_x = _load_calibration_images(cfg, loaded)
        if p.real_x is None:
            p.synth_cfg = preset(
                cfg.synth_preset, method=SYNTH_METHOD[cfg.calib], n=cfg.calib_size, seed=cfg.seed
            )
        p.search_cfg = search_preset(cfg.search_preset, bits, seed=cfg.seed, **cfg.search_overrides)
    with RunDir(cfg.out, resume=cfg.resume) as run_dir:
        report = _run(cfg, p, run_dir, log)
        report["seconds"] = round(time.time() - t_start, 1)
        atomic.write_json(run_dir.path("report.json"), report)
        run_dir.commit()
    return report


@dataclass
class _Prepared:
    """Everything checked and built before the run directory is touched."""

    loaded: LoadedModel
    qmodel: torch.nn.Module
    bits: BitsSpec
    profile: TargetProfile
    device: torch.device
    eval_x: torch.Tensor | None
    eval_y: torch.Tensor | None
    qparams: QParams | None = None  # --qparams, already installed on qmodel
    real_x: torch.Tensor | None = None  # --calib real
    synth_cfg: SynthConfig | None = None
    search_cfg: SearchConfig | None = None


def _run(cfg: RunConfig, p: _Prepared, run_dir: RunDir, log) -> dict:
    out, stage = Path(cfg.out), run_dir.path
    loaded, qmodel, bits, profile, device = p.loaded, p.qmodel, p.bits, p.profile, p.device
    eval_x, eval_y, pre = p.eval_x, p.eval_y, loaded.preprocess
    identity = None
    if p.search_cfg is not None and cfg.calib == "clamp":
        identity = {
            "model": loaded.name,
            "weights_sha256": loaded.weights_sha256,
            "bits": str(bits),
            "target": profile.name,
            "softmax": cfg.softmax,
            "synth": json.dumps(p.synth_cfg.to_dict(), sort_keys=True),
        }
        if cfg.resume:  # refuse a foreign or corrupt checkpoint before Stage 1, not after it
            load_checkpoint(
                run_dir.path(CHECKPOINT), search_identity(identity, p.search_cfg, qmodel)
            )
    if p.qparams is not None:
        qp = p.qparams
        log(f"using {cfg.qparams}")
    else:
        synth_record = None
        if p.real_x is not None:
            calib_x = p.real_x
        else:
            cache = cfg.cache_dir and Path(cfg.cache_dir)
            synth, _ = synthesize(loaded, p.synth_cfg, cache, log=log)
            calib_x = synth.images
            synth_record = {
                "config": synth.config.to_dict(),
                "misprediction_rate": synth.misprediction_rate,
                "seconds": round(synth.seconds, 2),
                "cached": synth.cached,
            }
        calib_x = calib_x.to(device)
        scfg = p.search_cfg
        fp_ref = loaded.model
        if cfg.calib == "clamp":
            fp_ref = prepare_equalization(loaded.model, qmodel, calib_x, scfg)
        log(
            f"calibrating {loaded.name} {bits} for {profile.name} on {len(calib_x)} {cfg.calib} images"
        )
        calibrate(qmodel, calib_x, cfg.range_method, cfg.percentile)
        mixed = None
        if bits.mixed:
            log(
                f"allocating bits for {bits}"
                + (f" under {cfg.budget_mb:g} MB" if cfg.budget_mb else "")
            )
            mixed = allocate_bits(bits, fp_ref, qmodel, calib_x, scfg, profile, cfg.budget_mb)
        header = {"model": loaded.name, "target": profile.name, "bits": str(bits)}
        search_record = None
        if cfg.calib == "clamp":
            log(f"searching ({cfg.search_preset}: {scfg.passes} passes x {scfg.cycles} cycles)")
            _, calib_x, slog = run_search(
                fp_ref,
                qmodel,
                calib_x,
                scfg,
                header,
                pre.pixel_bounds(),
                run_dir=run_dir.staging,
                identity=identity,
                resume=cfg.resume,
            )
            write_search_json(stage("search.json"), scfg, slog)
            if slog.refine:
                r = slog.refine
                log(
                    f"refined every scale in {r['steps']} steps: logit KL to FP "
                    f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}"
                )
            search_record = {
                "config": scfg.to_dict(),
                "seconds": round(slog.seconds, 1),
                "refreshes": slog.refreshes,
                "passes": slog.passes,
                "refine": slog.refine,
            }
        qp = collect_qparams(
            qmodel,
            **header,
            metadata={
                "timm_name": loaded.timm_name,
                "weights": loaded.weights,
                "weights_sha256": loaded.weights_sha256,
                "calibration": {
                    "source": cfg.calib,
                    "synth": synth_record,
                    "data": cfg.calib_data if cfg.calib == "real" else None,
                    "size": cfg.calib_size,
                    "range": cfg.range_method,
                    "percentile": cfg.percentile if cfg.range_method == "percentile" else None,
                    "seed": cfg.seed,
                },
                "search": search_record,
                "mixed_precision": mixed,
                "profile": profile.to_dict(),
                "bits_spec": bits.to_dict(),
                "preprocess": pre.to_dict(),
            },
        )
        qp.validate(profile)
        qp.save(stage("qparams.json"))

    # the deployed graph and its parity are CPU work
    loaded.model.cpu()
    qmodel.cpu()
    onnx_path = stage("model.qdq.onnx")
    log(f"exporting {out / onnx_path.name} (opset {profile.opset}, {profile.float_dtype})")
    proto = export_qdq(qmodel, pre.input_size, profile, onnx_path)
    violations = lint(proto, profile)
    if violations:
        raise UserError(
            f"exported graph breaks {profile.name} rules: {violations[0]} (+{len(violations) - 1} more)"
        )

    engine: dict | None = None
    if profile.name == "trt" and cfg.build_engine:
        if trt_build.available():
            log("building a TensorRT engine ahead of time")
            res = trt_build.build_engine(
                onnx_path, stage("model.engine"), input_shape=pre.input_size
            )
            engine = asdict(res)
        else:
            engine = {"skipped": f"TensorRT not installed; {trt_build.INSTALL_HINT}"}

    x = eval_x if eval_x is not None else noise_images(PARITY_NOISE_IMAGES, pre, cfg.seed + 1)
    log(f"parity on {len(x)} {'eval' if eval_x is not None else 'noise'} images")
    fp32 = TorchRunner(loaded.model, "fp32")(x)
    fq = TorchRunner(qmodel, "fakequant")(x)
    ort_logits = OrtRunner(onnx_path)(x)
    report = {
        "model": loaded.name,
        "bits": str(bits),
        "target": profile.name,
        "parity_inputs": {"source": cfg.eval_data or "noise", "count": len(x)},
        "accuracy": None,
        "agreement": {
            "ort": top1_agreement(ort_logits, fq),
            "fakequant_vs_fp32": top1_agreement(fq, fp32),
        },
        "logit_error": {"ort": logit_error(ort_logits, fq).to_dict()},
        "artifacts": {
            "qparams": str(out / "qparams.json") if not cfg.qparams else cfg.qparams,
            "onnx": str(out / onnx_path.name),
            "onnx_bytes": onnx_path.stat().st_size,
            "engine": engine,
        },
        "mixed_precision": _mixed_summary(qmodel, profile) if bits.mixed else None,
        "notes": [
            *loaded.notes,
            *_notes(bits, profile.name, any(q.twin for _, _, q in quantizers(qmodel))),
        ],
        "config": asdict(cfg),
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
