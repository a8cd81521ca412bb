"""The stages composed: load → synth → search → export → build → report.

Each stage lives in its own package and reads and writes files (``search/recipe.py``,
``export/stage.py``, ``build/stage.py``, ``report/stage.py``); this module checks every input
before any long work starts, then runs stages into one run directory (``rundir.RunDir``). The
CLI's one-shot command runs them all; each stage command runs one, from files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from clamp_export import atomic
from clamp_export.build.stage import ENGINE, FP16_ENGINE, build_stage, record_name
from clamp_export.build.trt import BuildOptions
from clamp_export.data.sources import load_images
from clamp_export.device import compute_device
from clamp_export.errors import UserError
from clamp_export.export.stage import (
    FLOAT_GRAPH,
    FP16_GRAPH,
    GRAPH,
    export_stage,
    fakequant_model,
)
from clamp_export.models import LoadedModel, load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import RANGE_METHODS
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import TargetProfile, get_profile
from clamp_export.report import html
from clamp_export.report.gates import GateResult, junit_xml
from clamp_export.report.stage import (
    REPORT,
    REPORT_HTML,
    REPORT_MD,
    ReportOptions,
    markdown,
    report_stage,
    summary_table,
)
from clamp_export.rundir import RunDir, read_manifest, require
from clamp_export.search import preset as search_preset
from clamp_export.search.recipe import QPARAMS, SEARCH_JSON, Recipe, search_stage
from clamp_export.synth import cached_folder, preset
from clamp_export.synth.generator import check_memory

CALIB_SOURCES = ("clamp", "noise", "real", "clamp-synth", "psaq")
# --calib clamp = Stage 1 (clamp images) + Stage 2 (search); the others are min-max/percentile
SYNTH_METHOD = {"clamp": "clamp", "noise": "noise", "clamp-synth": "clamp", "psaq": "psaq"}

__all__ = ["RunConfig", "build", "check", "export", "report", "run", "summary_table"]


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
    no_cache: bool = False  # search afresh: neither read nor write the qparams store
    range_method: str = "minmax"
    softmax: str = "uniform"  # levels of the softmax output: uniform or twin (fakequant.wrap_model)
    block_size: int = 64  # w4a16: input channels per INT4 weight scale (64 or 128)
    percentile: float = 99.99
    qparams: str | None = None  # reuse a qparams.json instead of calibrating
    eval_data: str | None = None
    eval_limit: int | None = None
    out: str = "out"
    seed: int = 0
    build_engine: bool = True
    build: BuildOptions = field(default_factory=BuildOptions)  # the profile comes from the report
    device: str = "cpu"  # where Stage 1 and Stage 2 run; export and parity run on the CPU
    report: ReportOptions = field(default_factory=ReportOptions)  # backends, batches, gates
    junit: str | None = None  # write the gates as JUnit XML here
    provenance: dict = field(default_factory=dict)  # e.g. the pipeline file; into the manifest

    def model_kwargs(self) -> dict:
        """The arguments of ``load_model``."""
        return dict(
            weights=self.weights,
            num_classes=self.num_classes,
            img_size=self.img_size,
            in_chans=self.in_chans,
            model_args=self.model_args,
            mean=self.mean,
            std=self.std,
            random_init=self.random_init,
        )


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
    if cfg.no_cache and cfg.qparams:
        raise UserError("--no-cache searches afresh, --qparams skips the search; pass one of them")
    if cfg.cache_dir:
        atomic.check_creatable_dir(cfg.cache_dir, "--cache-dir")
    atomic.check_creatable_dir(cfg.out, "--out")


def _bits(cfg: RunConfig) -> BitsSpec:
    """--bits, or under --budget-mb the mixed precision that the budget sets."""
    bits = BitsSpec.parse(cfg.bits or "w8a8")
    if bits.weight_only:
        return _weight_only(cfg, bits)
    if cfg.budget_mb is None or bits.mixed:
        return bits
    if cfg.bits is not None:
        raise UserError(
            f"--budget-mb chooses the weight bits itself, so it contradicts --bits {cfg.bits}; "
            "drop --bits, or pass --bits mp:W[xA] to cap the averages as well"
        )
    return BitsSpec(weight=8, act=8, mp_weight=8.0)  # the budget sets the average weight bits


def _weight_only(cfg: RunConfig, bits: BitsSpec) -> BitsSpec:
    """w4a16, checked against what it cannot combine with."""
    if not get_profile(cfg.target).weight_only_blocks:
        raise UserError(
            f"--bits {bits} (INT4 weight-only in blocks, FP16 activations) is TensorRT's format: "
            f"use --target trt, or --bits w4a8 on --target {cfg.target}"
        )
    if cfg.budget_mb is not None:
        raise UserError(f"--budget-mb chooses mixed precision; --bits {bits} is fixed INT4 weights")
    if cfg.softmax != "uniform":
        raise UserError(f"--softmax {cfg.softmax}: --bits {bits} does not quantize the softmax")
    return bits.with_block(cfg.block_size)


def _calibration_images(cfg: RunConfig, loaded: LoadedModel) -> torch.Tensor | None:
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


def _eval_images(source: str | None, limit: int | None, loaded: LoadedModel):
    if not source:
        return None, None
    x, y = load_images(source, loaded.preprocess, limit=limit, resize=False)
    if y is not None and int(y.max()) >= loaded.model.num_classes:
        raise UserError(
            f"labels of {source} go up to {int(y.max())} but {loaded.name} has "
            f"{loaded.model.num_classes} classes"
        )
    return x, y


def _recipe(cfg: RunConfig, bits: BitsSpec, real: bool) -> Recipe:
    synth = None
    if not real:
        synth = preset(
            cfg.synth_preset, method=SYNTH_METHOD[cfg.calib], n=cfg.calib_size, seed=cfg.seed
        )
    return Recipe(
        bits=bits,
        profile=get_profile(cfg.target),
        softmax=cfg.softmax,
        calib=cfg.calib,
        calib_data=cfg.calib_data if real else None,
        calib_size=cfg.calib_size,
        range_method=cfg.range_method,
        percentile=cfg.percentile,
        seed=cfg.seed,
        budget_mb=cfg.budget_mb,
        synth=synth,
        search=search_preset(cfg.search_preset, bits, seed=cfg.seed, **cfg.search_overrides),
    )


def _load(model: str, kwargs: dict, log) -> LoadedModel:
    loaded = load_model(model, **kwargs)
    for note in loaded.notes:
        log(f"warning: {note}")
    return loaded


def _describe(run_dir: RunDir, loaded: LoadedModel) -> None:
    run_dir.meta["model"] = {**loaded.load_args, "weights_sha256": loaded.weights_sha256}


@dataclass
class _Plan:
    """Everything checked and built before the run directory is touched."""

    loaded: LoadedModel
    qmodel: torch.nn.Module
    bits: BitsSpec
    profile: TargetProfile
    device: torch.device
    eval_x: torch.Tensor | None = None
    eval_y: torch.Tensor | None = None
    given: QParams | None = None  # --qparams, installed on qmodel
    recipe: Recipe | None = None  # otherwise what the search stage runs
    real_x: torch.Tensor | None = None  # --calib real


def check(cfg: RunConfig) -> None:
    """The checks that need no model: bad options are refused before anything is loaded."""
    _check(cfg)
    compute_device(cfg.device)
    _bits(cfg)
    get_profile(cfg.target)


def _prepare(cfg: RunConfig, log) -> _Plan:
    check(cfg)
    device = compute_device(cfg.device)
    bits, profile = _bits(cfg), get_profile(cfg.target)
    torch.manual_seed(cfg.seed)
    loaded = _load(cfg.model, cfg.model_kwargs(), log)
    eval_x, eval_y = _eval_images(cfg.eval_data, cfg.eval_limit, loaded)
    loaded.model.to(device)
    if cfg.qparams:
        given = QParams.load(cfg.qparams)
        if given.bits != str(bits) and not bits.mixed:
            raise UserError(f"{cfg.qparams} holds {given.bits} parameters but --bits is {bits}")
        given.validate(profile)
        qmodel, _ = fakequant_model(loaded, given)
        return _Plan(loaded, qmodel, bits, profile, device, eval_x, eval_y, given=given)
    qmodel = wrap_model(loaded.model, bits, profile, cfg.softmax)
    real_x = _calibration_images(cfg, loaded)
    recipe = _recipe(cfg, bits, real_x is not None)
    return _Plan(
        loaded, qmodel, bits, profile, device, eval_x, eval_y, recipe=recipe, real_x=real_x
    )


def _parameters(cfg: RunConfig, plan: _Plan, run_dir: RunDir, log) -> None:
    """qparams.json into the run directory: the file given, or the search stage's."""
    inputs = {"weights": plan.loaded.weights_sha256 or "random"}
    if plan.given is not None:
        shutil.copyfile(cfg.qparams, run_dir.path(QPARAMS))
        log(f"using {cfg.qparams}")
    else:
        searched = search_stage(
            plan.loaded,
            plan.qmodel,
            plan.recipe,
            run_dir.staging,
            real_x=plan.real_x,
            cache_root=_store(cfg),
            resume=cfg.resume,
            device=plan.device,
            log=log,
        )
        run_dir.meta["store"] = {
            "qparams": searched.key,
            "reused": None if searched.reused is None else str(searched.reused),
        }
        inputs["recipe_key"] = searched.key or "not stored"
    run_dir.record(QPARAMS, inputs)


def run(cfg: RunConfig, log=print, last_stage: str = "report") -> dict | None:
    """Run the stages up to ``last_stage`` ("search" or "report"); returns the report.

    Every input is checked before the long work starts, and the run writes into a staging
    folder that replaces the previous run's files only when it succeeds.
    """
    t_start = time.time()
    plan = _prepare(cfg, log)
    loaded, qmodel = plan.loaded, plan.qmodel
    first = "search" if last_stage == "search" else "synth"
    with RunDir(cfg.out, first_stage=first, resume=cfg.resume) as run_dir:
        _describe(run_dir, loaded)
        run_dir.meta["seed"] = cfg.seed
        run_dir.meta.update(cfg.provenance)
        _parameters(cfg, plan, run_dir, log)
        if last_stage == "search":
            run_dir.commit()
            return None
        loaded.model.cpu()  # the deployed graph and its parity are CPU work
        qmodel.cpu()
        graph = run_dir.path(GRAPH)
        export_stage(qmodel, loaded, plan.profile, graph, log)
        weights = loaded.weights_sha256 or "random"
        qparams_sha = atomic.sha256_file(run_dir.path(QPARAMS))
        for name in (GRAPH, FLOAT_GRAPH, FP16_GRAPH):
            if run_dir.path(name).exists():
                run_dir.record(name, {QPARAMS: qparams_sha, "weights": weights})
        engines = {}
        if plan.profile.name == "trt" and cfg.build_engine:
            options = replace(cfg.build, batches=cfg.report.batches, cache_root=_store(cfg))
            engines = _build_engines(run_dir, options, log)
        report = report_stage(
            loaded,
            qmodel,
            plan.bits,
            plan.profile,
            {"qdq": graph, "float": run_dir.path(FLOAT_GRAPH)},
            eval_x=plan.eval_x,
            eval_y=plan.eval_y,
            eval_source=cfg.eval_data,
            engines=engines,
            seed=cfg.seed,
            config=asdict(cfg),
            options=replace(
                cfg.report, store=_store(cfg), engine_cache=str(Path(cfg.out) / ORT_TRT_CACHE)
            ),
            log=log,
        )
        _write_report(run_dir, report, t_start, cfg.junit, _stage1_grid(cfg, plan))
        run_dir.commit()
    return report


def _stage1_grid(cfg: RunConfig, plan: _Plan) -> Path | None:
    """The Stage 1 image grid in the store, for the report (none for real or given data)."""
    if plan.recipe is None or plan.recipe.synth is None or not cfg.cache_dir:
        return None
    folder = cached_folder(plan.loaded, plan.recipe.synth, Path(cfg.cache_dir))
    return folder / "grid.png" if folder is not None else None


def _store(cfg: RunConfig) -> Path | None:
    """Where stored artifacts are reused (searched parameters, outputs, timing caches)."""
    return None if cfg.no_cache or not cfg.cache_dir else Path(cfg.cache_dir)


ORT_TRT_CACHE = "ort-trt-cache"  # a folder in the run directory: ORT's TensorRT EP engines
# backend name -> (graph, engine): the quantized engine, and the FP16 engine it is compared with
ENGINES = {"trt": (GRAPH, ENGINE), "trt-fp16": (FP16_GRAPH, FP16_ENGINE)}


def _build_engines(run_dir: RunDir, options: BuildOptions, log) -> dict[str, tuple[Path, dict]]:
    """Both engines of a ``trt`` run, into the run directory: {backend: (engine, record)}."""
    built = {}
    for backend, (graph, engine) in ENGINES.items():
        record = build_stage(
            run_dir.path(graph),
            "trt",
            run_dir.staging,
            log,
            options,
            engine,
            baseline=graph == FP16_GRAPH,
        )
        _record_engine(run_dir, run_dir.path(graph), engine)
        if "skipped" not in record:
            built[backend] = (run_dir.path(engine), record)
        elif backend == "trt":
            log(f"no engine built: {record['skipped']}")
            break
    return built


def _record_engine(run_dir: RunDir, graph: Path, engine: str) -> None:
    for name in (engine, record_name(engine)):
        if run_dir.path(name).exists():
            run_dir.record(name, {graph.name: atomic.sha256_file(graph)})


def _read_engines(run_path: Path) -> dict[str, tuple[Path, dict]]:
    """The engines a run directory holds, with their build records."""
    found = {}
    for backend, (_, engine) in ENGINES.items():
        record = run_path / record_name(engine)
        if (run_path / engine).is_file() and record.is_file():
            try:
                found[backend] = (run_path / engine, json.loads(record.read_text()))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{record} is corrupt; run build again") from None
    return found


def _write_report(
    run_dir: RunDir, report: dict, t_start: float, junit: str | None, grid: Path | None = None
) -> None:
    """report.json, report.md and report.html into the run; the gates as JUnit XML where asked."""
    report["seconds"] = round(time.time() - t_start, 1)
    atomic.write_json(run_dir.path(REPORT), report)
    atomic.write_text(run_dir.path(REPORT_MD), markdown(report))
    search = _json_if_any(run_dir.path(SEARCH_JSON)) or _json_if_any(run_dir.existing(SEARCH_JSON))
    picture = html.read_optional(grid or run_dir.existing("grid.png"))
    atomic.write_text(run_dir.path(REPORT_HTML), html.render(report, search, picture))
    graph = run_dir.path(GRAPH) if run_dir.path(GRAPH).exists() else run_dir.existing(GRAPH)
    for name in (REPORT, REPORT_MD, REPORT_HTML):
        run_dir.record(name, {GRAPH: atomic.sha256_file(graph)})
    if junit:
        gates = [GateResult(**g) for g in report["gates"]]
        atomic.write_text(junit, junit_xml(gates, f"clamp-export {report['model']}"))


def _json_if_any(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        return None


def export(model: str, model_kwargs: dict, qparams: str, out: str, log=print) -> Path:
    """``clamp-export export``: a searched ``qparams.json`` to a linted QDQ graph in ``out``."""
    atomic.check_creatable_dir(out, "--out")
    qp = QParams.load(qparams)
    loaded = _load(model, model_kwargs, log)
    qmodel, profile = fakequant_model(loaded, qp)
    in_place = Path(qparams).resolve() == (Path(out) / QPARAMS).resolve()
    # a qparams.json brought in from elsewhere replaces the search's files, so starts there
    with RunDir(out, first_stage="export" if in_place else "search") as run_dir:
        _describe(run_dir, loaded)
        if not in_place:
            shutil.copyfile(qparams, run_dir.path(QPARAMS))
        export_stage(qmodel, loaded, profile, run_dir.path(GRAPH), log)
        run_dir.record(
            GRAPH,
            {QPARAMS: atomic.sha256_file(qparams), "weights": loaded.weights_sha256 or "random"},
        )
        run_dir.commit()
    return Path(out) / GRAPH


def build(
    onnx_path: str, target: str, out: str, options: BuildOptions | None = None, log=print
) -> dict:
    """``clamp-export build``: an engine (and its record) from a graph, after the lint; the
    FP16 baseline engine too where the graph's run directory holds its FP16 graph."""
    atomic.check_creatable_dir(out, "--out")
    if not Path(onnx_path).is_file():
        raise UserError(f"ONNX file {onnx_path} not found")
    options = options or BuildOptions()
    options.check()
    fp16 = Path(onnx_path).parent / FP16_GRAPH
    with RunDir(out, first_stage="build") as run_dir:
        record = build_stage(Path(onnx_path), target, run_dir.staging, log, options)
        _record_engine(run_dir, Path(onnx_path), ENGINE)
        if "skipped" not in record and fp16.is_file():
            build_stage(fp16, target, run_dir.staging, log, options, FP16_ENGINE, baseline=True)
            _record_engine(run_dir, fp16, FP16_ENGINE)
        run_dir.commit()
    return record


def report(
    run_dir_path: str,
    eval_data: str | None,
    eval_limit: int | None,
    options: ReportOptions | None = None,
    junit: str | None = None,
    log=print,
) -> dict:
    """``clamp-export report``: parity of a run directory's artifacts, recomputed from files."""
    t_start = time.time()
    run_path = Path(run_dir_path)
    if not run_path.is_dir():
        raise UserError(f"run directory {run_path} not found")
    manifest = read_manifest(run_path)
    require(run_path, QPARAMS, GRAPH, FLOAT_GRAPH)
    described = manifest.get("model")
    if not isinstance(described, dict) or "name" not in described:
        raise UserError(f"{run_path}/manifest.json does not say which model made the run")
    described = dict(described)
    digest = described.pop("weights_sha256", None)
    loaded = _load(described.pop("name"), described, log)
    if loaded.weights_sha256 != digest:
        raise UserError(
            f"the weights {loaded.weights} changed since the run (sha256 {loaded.weights_sha256} "
            f"against {digest} in the manifest); re-run the pipeline"
        )
    eval_x, eval_y = _eval_images(eval_data, eval_limit, loaded)
    qp = QParams.load(run_path / QPARAMS)
    qmodel, profile = fakequant_model(loaded, qp)
    engines = _read_engines(run_path)
    with RunDir(run_path, first_stage="report") as run_dir:
        result = report_stage(
            loaded,
            qmodel,
            BitsSpec.parse(qp.bits),
            profile,
            {"qdq": run_path / GRAPH, "float": run_path / FLOAT_GRAPH},
            eval_x=eval_x,
            eval_y=eval_y,
            eval_source=eval_data,
            engines=engines,
            seed=int(manifest.get("seed", 0)),
            config={"run_dir": str(run_path), "eval_data": eval_data, "eval_limit": eval_limit},
            options=replace(options or ReportOptions(), engine_cache=str(run_path / ORT_TRT_CACHE)),
            log=log,
        )
        _write_report(run_dir, result, t_start, junit)
        run_dir.commit()
    return result
