"""The click CLI. ``clamp-export MODEL ...`` runs everything; stage subcommands sit beside it.

Every ``UserError`` (and click's own usage errors) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clamp_export.errors import UserError
from clamp_export.quant.bits import SOFTMAX_LEVELS
from clamp_export.search.config import FITNESS, REFINE_LOSSES

DEFAULT_COMMAND = "quantize"


class _DefaultGroup(click.Group):
    """Routes ``clamp-export MODEL ...`` to the ``quantize`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"malformed {flag} {text!r}: expected comma-separated numbers") from None


_MODEL_OPTIONS = [
    click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        help=".safetensors, .pth/.pt or timm checkpoint.",
    ),
    click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="KEY=VALUE",
        help="Passed to timm.create_model.",
    ),
    click.option("--num-classes", type=int),
    click.option("--img-size", type=int),
    click.option("--in-chans", type=int),
    click.option("--mean", help="Comma-separated per-channel mean (overrides the model's)."),
    click.option("--std", help="Comma-separated per-channel std."),
    click.option(
        "--random-weights",
        is_flag=True,
        help="Randomly initialized model: for memory and speed checks only (accuracy is meaningless).",
    ),
]


def model_options(f):
    """The options that say which model and weights, shared by every command that loads one."""
    for option in reversed(_MODEL_OPTIONS):
        f = option(f)
    return f


device_option = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where Stage 1 and Stage 2 run: cpu, cuda or cuda:N (export and parity use the CPU).",
)


def _model_kwargs(kw: dict) -> dict:
    from clamp_export.models import parse_model_args

    if kw["random_weights"] and kw["weights"]:
        raise UserError("--random-weights and --weights contradict each other; pass one of them")
    return dict(
        weights=kw["weights"],
        random_init=kw["random_weights"],
        num_classes=kw["num_classes"],
        img_size=kw["img_size"],
        in_chans=kw["in_chans"],
        model_args=parse_model_args(kw["model_args"]),
        mean=_floats(kw["mean"], "--mean"),
        std=_floats(kw["std"], "--std"),
    )


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clamp-export")
def cli() -> None:
    """Data-free CLAMP-ViT quantization of timm ViTs → QDQ ONNX, TensorRT, ONNX Runtime.

    \b
    clamp-export MODEL --bits w4a8 --target trt     run everything (the `quantize` command)
    clamp-export lint MODEL.onnx --target trt       check a graph against the target's rules
    """


_RECIPE_OPTIONS = [
    click.option(
        "--bits",
        help="wXaY (X, Y in 2..8), w4a16 (INT4 weight-only, trt), or mp:W / mp:WxA mixed "
        "precision.  [default: w8a8]",
    ),
    click.option(
        "--budget-mb",
        type=float,
        help="Mixed precision under a model-size budget (packed MB); with --bits only as mp:W[xA].",
    ),
    click.option("--target", default="ort", show_default=True, help="ort or trt."),
    click.option(
        "--calib",
        default="clamp",
        show_default=True,
        help="clamp (Stage 1 + Stage 2 search), clamp-synth, psaq, noise or real.",
    ),
    click.option(
        "--calib-data",
        default="fmnist-train",
        show_default=True,
        help="For --calib real: fmnist-train or PATH.",
    ),
    click.option("--calib-size", default=32, show_default=True, type=int),
    click.option(
        "--synth-preset",
        default="default",
        show_default=True,
        help="Stage 1 preset: default or fast.",
    ),
    click.option(
        "--search-preset",
        default="default",
        show_default=True,
        help="Stage 2 preset: default (2 passes), thorough (3 passes, twice the image refreshes), fast or paper.",
    ),
    click.option(
        "--no-cyclic", is_flag=True, help="Ablation: no cyclic image refinement during the search."
    ),
    click.option(
        "--equalize/--no-equalize",
        default=None,
        help="Search an equalized model: LayerNorm->linear, q/k and v/proj channel factors that "
        "even out per-tensor ranges, exact in float, stored in qparams.json (default: the preset's).",
    ),
    click.option(
        "--refine-steps",
        type=click.IntRange(min=0),
        help="Adam steps of the scale refinement after the search: every scale at once, to the "
        "float logits on randomly shifted Stage 1 images; 0 turns it off (default: the preset's, "
        "300 below 8-bit activations).",
    ),
    click.option(
        "--refine-loss",
        type=click.Choice(REFINE_LOSSES),
        help="The scale refinement's distance to the float model: logprob_mse (squared error of "
        "every class's log-probability, the presets' default below 8-bit activations) or kl "
        "(the default of the W4A16 weight-only refinement, and before).",
    ),
    click.option(
        "--refine-flip/--no-refine-flip",
        default=None,
        help="Mirror each scale-refinement image left to right with probability 1/2, as most "
        "image classifiers' training augmentation does; leave it off for models trained without "
        "mirrored images (default: the preset's, off in every preset).",
    ),
    click.option(
        "--fitness",
        type=click.Choice(FITNESS),
        help="Stage 2 fitness: contrastive (L_C2, the presets' default below 8-bit activations), "
        "both (L_C2 + L_O, the paper's; the default at 8-bit activations) or output (L_O).",
    ),
    click.option("--resume", is_flag=True, help="Continue the search checkpointed in --out."),
    click.option(
        "--cache-dir",
        default="calib",
        show_default=True,
        envvar="CLAMP_EXPORT_CACHE",
        help="Calibration artifact store (also $CLAMP_EXPORT_CACHE).",
    ),
    click.option(
        "--no-cache",
        is_flag=True,
        help="Search afresh: neither reuse nor store searched parameters (Stage 1 sets stay cached).",
    ),
    click.option(
        "--range", "range_method", default="minmax", show_default=True, help="minmax or percentile."
    ),
    click.option("--percentile", default=99.99, show_default=True, type=float),
    click.option(
        "--softmax",
        type=click.Choice(SOFTMAX_LEVELS),
        default="uniform",
        show_default=True,
        help="Levels of the softmax output: one uniform grid, or twin-uniform (fine steps below "
        "1/8, coarse above, the same bit count; two int8 attn @ v matmuls). Twin gains at 4-bit "
        "activations.",
    ),
    click.option(
        "--block-size",
        default=64,
        show_default=True,
        type=int,
        help="--bits w4a16: input channels per INT4 weight scale (TensorRT runs 64 or 128).",
    ),
    click.option("--seed", default=0, show_default=True, type=int),
]


_REPORT_OPTIONS = [
    click.option(
        "--backends",
        help="Comma-separated backends to report (default: every one, skipping those that cannot "
        "run here): torch-fp32, torch-fakequant, ort-fp32, ort-qdq, ort-cuda, ort-trt, trt, "
        "trt-fp16.",
    ),
    click.option(
        "--batch",
        "batches",
        default="1,8,32",
        show_default=True,
        help="Batch sizes of the latency sweep, comma-separated.",
    ),
    click.option("--threads", type=click.IntRange(min=1), help="Pin torch and ORT CPU threads."),
    click.option(
        "--duration",
        type=click.FloatRange(min=0),
        default=1.0,
        show_default=True,
        envvar="CLAMP_EXPORT_DURATION",
        help="Minimum seconds of timed runs per batch size, all backends together (as trtexec's "
        "--duration; at least 20 rounds either way).",
    ),
    click.option("--max-top1-drop", type=float, help="Gate: top-1 points below FP32, per backend."),
    click.option(
        "--min-agreement", type=float, help="Gate: top-1 agreement with fake-quant, 0..1."
    ),
    click.option("--max-mean-logit-error", type=float, help="Gate: mean |logit - fake-quant|."),
    click.option(
        "--min-speedup",
        help="Gate: quantized over its float baseline on the same runtime, R or R@BATCH (batch 8).",
    ),
    click.option("--junit", type=click.Path(dir_okay=False), help="Write the gates as JUnit XML."),
]


_BUILD_OPTIONS = [
    click.option(
        "--builder-optimization-level",
        type=int,
        help="TensorRT builder optimization level 0..5 (TensorRT's default: 3).",
    ),
    click.option("--workspace-mb", type=int, help="TensorRT workspace memory pool limit."),
    click.option(
        "--compute-capability",
        help="TensorRT-RTX ahead-of-time targets, comma-separated, e.g. 8.9,12.0.",
    ),
]


def build_options(f):
    """How TensorRT builds engines, shared by the one-shot and `build`."""
    for option in reversed(_BUILD_OPTIONS):
        f = option(f)
    return f


def _build_options(kw: dict, batches: tuple[int, ...] = (1, 8, 32)):
    from clamp_export.build.trt import BuildOptions, parse_compute_capabilities

    options = BuildOptions(
        batches=batches,
        optimization_level=kw["builder_optimization_level"],
        workspace_mb=kw["workspace_mb"],
        compute_capabilities=parse_compute_capabilities(kw["compute_capability"]),
    )
    options.check()  # before any work
    return options


def report_options(f):
    """Backends, the latency sweep and the CI gates, shared by the one-shot and `report`."""
    for option in reversed(_REPORT_OPTIONS):
        f = option(f)
    return f


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"malformed --batch {text!r}: expected e.g. 1,8,32") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch {text} must list batch sizes of at least 1")
    return batches


def _report_options(kw: dict):
    from clamp_export.report.gates import Gates
    from clamp_export.report.latency import Timing
    from clamp_export.report.stage import ReportOptions
    from clamp_export.runtime.backends import parse_backends, unavailable

    backends, asked = parse_backends(kw["backends"])
    batches = _batches(kw["batches"])
    ratio, at = Gates.parse_speedup(kw["min_speedup"])
    gates = Gates(kw["max_top1_drop"], kw["min_agreement"], kw["max_mean_logit_error"], ratio, at)
    if gates.min_speedup is not None and at not in batches:
        raise UserError(
            f"--min-speedup at batch {at}, but --batch {kw['batches']} does not time it"
        )
    from clamp_export.device import compute_device

    device = str(compute_device(kw.get("device", "cpu")))  # an unusable device: refused now
    unavailable(backends, asked, device)  # an asked-for backend that cannot run: refused now
    timing = Timing(min_seconds=kw["duration"])
    return ReportOptions(backends, asked, batches, kw["threads"], device, gates, timing)


def _exit_on_failed_gates(report: dict) -> None:
    failed = [g for g in report["gates"] if not g["passed"]]
    for g in failed:
        click.echo(f"clamp-export: gate failed: {g['name']}: {g['message']}", err=True)
    if failed:
        sys.exit(1)


def recipe_options(f):
    """The options that decide the searched parameters, shared by the one-shot and `search`."""
    for option in reversed(_RECIPE_OPTIONS):
        f = option(f)
    return f


def _run_config(kw: dict, **extra):
    from clamp_export.pipeline import RunConfig

    return RunConfig(
        model=kw["model"],
        bits=kw["bits"],
        target=kw["target"],
        **_model_kwargs(kw),
        calib=kw["calib"],
        calib_data=kw["calib_data"],
        calib_size=kw["calib_size"],
        synth_preset=kw["synth_preset"],
        search_preset=kw["search_preset"],
        search_overrides={
            "cyclic": False if kw["no_cyclic"] else None,
            "fitness": kw["fitness"],
            "equalize": kw["equalize"],
            "refine_steps": kw["refine_steps"],
            "refine_loss": kw["refine_loss"],
            "refine_flip": kw["refine_flip"],
        },
        resume=kw["resume"],
        budget_mb=kw["budget_mb"],
        cache_dir=kw["cache_dir"],
        no_cache=kw["no_cache"],
        range_method=kw["range_method"],
        percentile=kw["percentile"],
        softmax=kw["softmax"],
        block_size=kw["block_size"],
        out=kw["out"],
        seed=kw["seed"],
        device=kw["device"],
        **extra,
    )


def _log(message: str) -> None:
    click.echo(message, err=True)


@cli.command(DEFAULT_COMMAND)
@click.argument("model")
@model_options
@recipe_options
@click.option(
    "--qparams",
    "qparams_file",
    type=click.Path(dir_okay=False),
    help="Use this qparams.json instead of calibrating.",
)
@click.option("--eval-data", help="fmnist, an IDX folder, an image class-folder or a tensor file.")
@click.option("--eval-limit", type=int, help="Evaluate on the first N images only.")
@click.option("--out", default="out", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-engine", is_flag=True, help="With --target trt: skip the TensorRT build.")
@build_options
@report_options
@device_option
def quantize(**kw) -> None:
    """Quantize MODEL, export QDQ ONNX (and a TensorRT engine) and check parity."""
    from clamp_export.pipeline import run, summary_table

    report = run(_quantize_config(kw), log=_log)
    click.echo(summary_table(report))
    _exit_on_failed_gates(report)


def _quantize_config(kw: dict, **extra):
    """The one-shot command's RunConfig, every cheap check done (``run`` checks all first)."""
    from clamp_export.pipeline import check

    report = _report_options(kw)
    cfg = _run_config(
        kw,
        qparams=kw["qparams_file"],
        eval_data=kw["eval_data"],
        eval_limit=kw["eval_limit"],
        build_engine=not kw["no_engine"],
        build=_build_options(kw, report.batches),
        report=report,
        junit=kw["junit"],
        **extra,
    )
    check(cfg)
    return cfg


@cli.command("run")
@click.argument("pipelines", nargs=-1, type=click.Path())
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of every pipeline, e.g. --set calibration.seed=1 (a YAML value).",
)
@click.option(
    "--out", "out_root", type=click.Path(file_okay=False), help="Run into OUT/NAME instead."
)
@click.option("--dry-run", is_flag=True, help="Check the pipelines and print their commands.")
@click.option("--keys", is_flag=True, help="List every key a pipeline may set, with defaults.")
def run_cmd(pipelines, sets, out_root, dry_run, keys) -> None:
    """Run pipeline files (pipelines/*.yaml) in sequence, then one summary table.

    Every file is checked before the first one starts. Exit 0 when all gates pass, 1 when one
    failed, 2 for bad input (a pipeline that stops on bad input is reported and the rest run).
    """
    from clamp_export import pipefile

    if keys:
        click.echo(pipefile.table(_command_defaults()), nl=False)
        return
    if not pipelines:
        raise UserError("name at least one pipeline file, e.g. pipelines/fmnist_vit-w4a8-trt.yaml")
    loaded = [pipefile.load(p, sets, out_root) for p in pipelines]
    _refuse_shared_outputs(loaded)
    configs = [_pipeline_config(p) for p in loaded]
    if dry_run:
        for p in loaded:
            click.echo(f"{p.file}: {p.command}")
        return
    from clamp_export.pipeline import run
    from clamp_export.report.runs import Outcome, summary

    outcomes = []
    for i, (p, cfg) in enumerate(zip(loaded, configs, strict=True), 1):
        _log(f"== [{i}/{len(loaded)}] {p.name}: {p.command}")
        outcomes.append(Outcome.of(p.name, cfg.out, lambda cfg=cfg: run(cfg, log=_log), _log))
    click.echo(summary(outcomes))
    for o in outcomes:
        for g in o.failed_gates:
            click.echo(
                f"clamp-export: gate failed: {o.name}: {g['name']}: {g['message']}", err=True
            )
    sys.exit(max(o.exit_code for o in outcomes))


def _command_defaults() -> dict:
    """{flag: default} of the one-shot command: a pipeline key left out takes these."""
    plain = (str, int, float)
    return {
        opt: p.default for p in quantize.params for opt in p.opts if isinstance(p.default, plain)
    }


def _refuse_shared_outputs(pipelines) -> None:
    seen = {}
    for p in pipelines:
        key = str(Path(p.out).resolve())
        if key in seen:
            raise UserError(f"{seen[key]} and {p.file} both write {p.out}; give one another out")
        seen[key] = p.file


def _pipeline_config(p):
    """The pipeline's command parsed by the one-shot command itself: the same defaults and
    checks; an error names the file."""
    try:
        ctx = quantize.make_context("quantize", list(p.argv))
        return _quantize_config(ctx.params, provenance=p.provenance)
    except UserError as e:
        raise UserError(f"{p.file}: {e}") from None
    except click.ClickException as e:
        raise UserError(f"{p.file}: {e.format_message()}") from None


@cli.command("search")
@click.argument("model")
@model_options
@recipe_options
@click.option("--out", required=True, type=click.Path(file_okay=False))
@device_option
def search_cmd(**kw) -> None:
    """Stage 1 + 2 (or a baseline calibration): qparams.json and search.json in --out."""
    from clamp_export.pipeline import run

    run(_run_config(kw), log=_log, last_stage="search")
    click.echo(f"{kw['out']}/qparams.json")


@cli.command("export")
@click.argument("model")
@model_options
@click.option("--qparams", "qparams_file", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
def export_cmd(**kw) -> None:
    """QDQ ONNX from a searched qparams.json (model.qdq.onnx in --out), linted for its target."""
    from clamp_export.pipeline import export

    click.echo(export(kw["model"], _model_kwargs(kw), kw["qparams_file"], kw["out"], log=_log))


@cli.command("build")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--target", default="trt", show_default=True, help="trt (engines are TensorRT's).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--batch",
    "batches",
    default="1,8,32",
    show_default=True,
    help="The optimization profile spans these batch sizes (min, median, max).",
)
@build_options
def build_cmd(onnx_file: str, target: str, out: str, **kw) -> None:
    """A TensorRT engine from a QDQ graph (model.engine and model.engine.json in --out), and
    the FP16 baseline engine where model.fp16.onnx lies beside the graph."""
    from clamp_export.pipeline import build

    options = _build_options(kw, _batches(kw["batches"]))
    record = build(onnx_file, target, out, options, log=_log)
    if "skipped" in record:
        raise UserError(f"no engine built: {record['skipped']}")
    click.echo(
        f"{out}/model.engine: {record['plan_bytes']} bytes, {record['module']} {record['version']}"
    )


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--eval-data", help="fmnist, an IDX folder, an image class-folder or a tensor file.")
@click.option("--eval-limit", type=int, help="Evaluate on the first N images only.")
@report_options
@click.option(
    "--device", default="cpu", show_default=True, help="Where the torch backends run: cpu or cuda."
)
def report_cmd(**kw) -> None:
    """Every backend against fake-quant on RUN_DIR's files (report.json, report.md)."""
    from clamp_export.pipeline import report, summary_table

    if kw["eval_limit"] is not None and kw["eval_limit"] < 1:
        raise UserError("--eval-limit must be at least 1")
    options = _report_options(kw)
    result = report(
        kw["run_dir"], kw["eval_data"], kw["eval_limit"], options, kw["junit"], log=_log
    )
    click.echo(summary_table(result))
    _exit_on_failed_gates(result)


@cli.command("verify")
@click.argument("run_dir", type=click.Path(file_okay=False))
def verify_cmd(run_dir: str) -> None:
    """Recompute every hash in RUN_DIR/manifest.json; exit 1 naming what differs."""
    from clamp_export.rundir import verify

    problems = verify(run_dir)
    for line in problems:
        click.echo(f"{run_dir}/{line}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{run_dir}: every artifact matches its manifest")


@cli.command("synth")
@click.argument("model")
@model_options
@click.option("--method", default="clamp", show_default=True, help="clamp, psaq or noise.")
@click.option("--n", default=32, show_default=True, type=int, help="Number of images.")
@click.option(
    "--preset", "preset_name", default="default", show_default=True, help="default or fast."
)
@click.option("--steps", type=int, help="Override the preset's optimization steps.")
@click.option("--lr", type=float)
@click.option("--tau", type=float, help="InfoNCE temperature.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--cache-dir",
    default="calib",
    show_default=True,
    envvar="CLAMP_EXPORT_CACHE",
    help="Calibration artifact store (also $CLAMP_EXPORT_CACHE).",
)
@click.option("--no-cache", is_flag=True)
@device_option
def synth_cmd(**kw) -> None:
    """Stage 1: synthetic calibration images (images.safetensors, grid.png, synth.json)."""

    from clamp_export.atomic import check_creatable_dir
    from clamp_export.device import compute_device
    from clamp_export.models import load_model
    from clamp_export.rundir import RunDir
    from clamp_export.synth import meta_of, preset, synthesize
    from clamp_export.synth.generator import check_memory
    from clamp_export.synth.store import copy_set, write_files

    cfg = preset(
        kw["preset_name"],
        method=kw["method"],
        n=kw["n"],
        steps=kw["steps"],
        lr=kw["lr"],
        tau=kw["tau"],
        seed=kw["seed"],
    )
    device = compute_device(kw["device"])
    out = check_creatable_dir(kw["out"], "--out")
    cache = None if kw["no_cache"] else check_creatable_dir(kw["cache_dir"], "--cache-dir")
    loaded = load_model(kw["model"], **_model_kwargs(kw))
    for note in loaded.notes:
        _log(f"warning: {note}")
    check_memory(loaded.model, loaded.preprocess, cfg.n, cfg.method != "noise" and cfg.steps > 0)
    loaded.model.to(device)
    with RunDir(out) as run_dir:
        result, folder = synthesize(loaded, cfg, cache, log=_log)
        if folder is not None:
            copy_set(folder, run_dir.staging)
        else:
            write_files(result, loaded.preprocess, run_dir.staging, meta_of(loaded))
        run_dir.commit()
    click.echo(
        f"{len(result.images)} {cfg.method} images for {loaded.name} in {out}: misprediction rate "
        f"{100 * result.misprediction_rate:.1f}%, {result.seconds:.1f}s"
        f"{' (reused from cache)' if result.cached else ''}"
    )


@cli.command("lint")
@click.argument("onnx_file", type=click.Path())
@click.option("--target", default="trt", show_default=True, help="ort or trt.")
def lint_cmd(onnx_file: str, target: str) -> None:
    """Check ONNX_FILE against the target's rules; exit 1 on any violation."""
    from clamp_export.export.lint import lint_file
    from clamp_export.quant.targets import get_profile

    violations = lint_file(onnx_file, get_profile(target))
    for v in violations:
        click.echo(str(v))
    if violations:
        click.echo(f"{len(violations)} violation(s) of the {target} rules in {onnx_file}", err=True)
        sys.exit(1)
    click.echo(f"{onnx_file}: clean for {target}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as e:  # one line, whatever a library put into the message
        click.echo(f"clamp-export: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("clamp-export: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"clamp-export: error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
