"""Every key a pipeline file may hold: its JSON Schema, what it means and the option it sets.

A pipeline is a saved ``clamp-export MODEL ...`` command: each key sets one option of that
command, so the defaults are the command's own (one place, shown by ``clamp-export run --keys``
and in docs/pipelines.md) and a pipeline runs exactly what its command line would.
"""

from __future__ import annotations

from dataclasses import dataclass

from clamp_export.quant.bits import SOFTMAX_LEVELS
from clamp_export.quant.calibrate import RANGE_METHODS
from clamp_export.quant.targets import PROFILES
from clamp_export.runtime.backends import BACKENDS
from clamp_export.search.config import FITNESS, REFINE_LOSSES
from clamp_export.search.config import PRESETS as SEARCH_PRESETS
from clamp_export.synth.config import PRESETS as SYNTH_PRESETS

CALIB_METHODS = ("clamp", "clamp-synth", "psaq", "noise", "real")

_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer"}
_POS_INT = {"type": "integer", "minimum": 1}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}


def _enum(values) -> dict:
    return {"type": "string", "enum": list(values)}


@dataclass(frozen=True)
class Key:
    path: str  # dotted, e.g. "calibration.seed"
    schema: dict
    help: str
    flag: str | None = None  # the option it sets; "--on/--off" for a switch
    form: str = "value"  # value, list (comma-joined), switch, weights, model-args

    def argv(self, v) -> list[str]:
        """The value as the one-shot command's arguments."""
        if self.form == "list":
            return [self.flag, ",".join(str(x) for x in v)]
        if self.form == "switch":
            on, off = self.flag.split("/")
            return [f] if (f := on if v else off) else []
        if self.form == "weights":
            return {"pretrained": [], "random": ["--random-weights"]}.get(v, ["--weights", v])
        if self.form == "model-args":
            return [a for k, x in v.items() for a in ("--model-arg", f"{k}={x!r}")]
        return [self.flag, str(v)] if self.flag else []


KEYS: tuple[Key, ...] = (
    Key(
        "name",
        {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"},
        "Names the run in the summary and the default `out`; the file's stem.",
    ),
    Key("model.name", _STR, "A clamp-export alias (fmnist_vit, deit_s, ...) or a timm name."),
    Key(
        "model.weights",
        _STR,
        "A .safetensors/.pth path; `pretrained` for timm's hub weights (the default for "
        "aliases without bundled weights); `random` for speed and memory checks only.",
        form="weights",
    ),
    Key(
        "model.args",
        {"type": "object"},
        "Keyword arguments of timm.create_model.",
        form="model-args",
    ),
    Key("model.num_classes", _POS_INT, "Classes of the head.", "--num-classes"),
    Key("model.img_size", _POS_INT, "Input size in pixels.", "--img-size"),
    Key("model.in_chans", _POS_INT, "Input channels.", "--in-chans"),
    Key(
        "model.preprocess.mean",
        {"type": "array", "items": _NUM, "minItems": 1},
        "Per-channel mean (default: the model's).",
        "--mean",
        "list",
    ),
    Key(
        "model.preprocess.std",
        {"type": "array", "items": _NUM, "minItems": 1},
        "Per-channel std (default: the model's).",
        "--std",
        "list",
    ),
    Key(
        "bits",
        _STR,
        "wXaY (X, Y in 2..8), w4a16 (INT4 weight-only, trt), or mp:W / mp:WxA mixed precision; "
        "required unless budget_mb.",
        "--bits",
    ),
    Key(
        "budget_mb",
        {"type": "number", "exclusiveMinimum": 0},
        "Mixed precision under a packed model-size budget.",
        "--budget-mb",
    ),
    Key("target", _enum(PROFILES), "The deployment target's graph rules.", "--target"),
    Key(
        "engine",
        _BOOL,
        "Build the TensorRT engine (target trt); true unless set false.",
        "/--no-engine",
        "switch",
    ),
    Key("device", _STR, "Where Stage 1 and 2 run: cpu, cuda or cuda:N.", "--device"),
    Key(
        "build.optimization_level",
        {"type": "integer", "minimum": 0, "maximum": 5},
        "TensorRT builder optimization level (TensorRT's default: 3).",
        "--builder-optimization-level",
    ),
    Key("build.workspace_mb", _POS_INT, "TensorRT workspace memory limit.", "--workspace-mb"),
    Key(
        "build.compute_capabilities",
        {"type": "array", "items": _STR, "minItems": 1},
        'TensorRT-RTX ahead-of-time targets, e.g. ["8.9", "12.0"].',
        "--compute-capability",
        "list",
    ),
    Key(
        "calibration.method",
        _enum(CALIB_METHODS),
        "clamp = Stage 1 + Stage 2 search; the others are calibration baselines.",
        "--calib",
    ),
    Key(
        "calibration.data",
        _STR,
        "For method real: fmnist-train or a path.",
        "--calib-data",
    ),
    Key("calibration.size", _POS_INT, "Calibration images.", "--calib-size"),
    Key(
        "calibration.synth_preset",
        _enum(SYNTH_PRESETS),
        "Stage 1 preset.",
        "--synth-preset",
    ),
    Key(
        "calibration.search_preset",
        _enum(SEARCH_PRESETS),
        "Stage 2 preset: `default` (2 passes, one image refresh per layer), `thorough` (3 passes, "
        "a refresh every 2 cycles: the default before), `fast`, `paper`.",
        "--search-preset",
    ),
    Key("calibration.seed", _INT, "Seed of Stage 1 and 2.", "--seed"),
    Key(
        "calibration.range",
        _enum(RANGE_METHODS),
        "Activation ranges of the baselines.",
        "--range",
    ),
    Key(
        "calibration.percentile",
        _NUM,
        "With range percentile.",
        "--percentile",
    ),
    Key(
        "calibration.softmax",
        _enum(SOFTMAX_LEVELS),
        "Levels of the softmax output.",
        "--softmax",
    ),
    Key(
        "calibration.block_size",
        {"type": "integer", "enum": [64, 128]},
        "bits w4a16: input channels per INT4 weight scale.",
        "--block-size",
    ),
    Key(
        "calibration.cyclic",
        _BOOL,
        "Cyclic image refinement during the search; true unless set false (an ablation).",
        "/--no-cyclic",
        "switch",
    ),
    Key(
        "calibration.equalize",
        _BOOL,
        "Search an equalized model (default: the preset's).",
        "--equalize/--no-equalize",
        "switch",
    ),
    Key(
        "calibration.refine_steps",
        {"type": "integer", "minimum": 0},
        "Scale-refinement steps after the search (default: the preset's).",
        "--refine-steps",
    ),
    Key(
        "calibration.refine_loss",
        _enum(REFINE_LOSSES),
        "The scale refinement's loss: `logprob_mse` or `kl` (default: the preset's).",
        "--refine-loss",
    ),
    Key(
        "calibration.refine_flip",
        _BOOL,
        "Mirror the scale refinement's images at random (default: the preset's).",
        "--refine-flip/--no-refine-flip",
        "switch",
    ),
    Key(
        "calibration.fitness",
        _enum(FITNESS),
        "Stage 2 fitness (default: the preset's).",
        "--fitness",
    ),
    Key(
        "calibration.cache_dir",
        _STR,
        "The artifact store: an unchanged recipe reuses its searched parameters.",
        "--cache-dir",
    ),
    Key(
        "eval.data",
        _STR,
        "fmnist, an IDX folder, an image class-folder or a tensor file; `${VAR}` reads the "
        "environment (default: 64 seeded noise images).",
        "--eval-data",
    ),
    Key("eval.limit", _POS_INT, "Evaluate on the first N images only.", "--eval-limit"),
    Key(
        "report.backends",
        {"type": "array", "items": _enum(BACKENDS), "minItems": 1},
        "Backends to report; named ones must run (default: all, skipping those that cannot).",
        "--backends",
        "list",
    ),
    Key(
        "report.batches",
        {"type": "array", "items": _POS_INT, "minItems": 1},
        "Batch sizes of the latency sweep.",
        "--batch",
        "list",
    ),
    Key("report.threads", _POS_INT, "Pin torch and ORT CPU threads.", "--threads"),
    Key(
        "report.duration",
        {"type": "number", "minimum": 0},
        "Minimum timed seconds per batch size.",
        "--duration",
    ),
    Key(
        "gates.max_top1_drop",
        {"type": "number", "minimum": 0},
        "Top-1 points below FP32, per quantized backend.",
        "--max-top1-drop",
    ),
    Key(
        "gates.min_agreement",
        {"type": "number", "minimum": 0, "maximum": 1},
        "Top-1 agreement with fake-quant, 0..1.",
        "--min-agreement",
    ),
    Key(
        "gates.max_mean_logit_error",
        {"type": "number", "minimum": 0},
        "Mean |logit - fake-quant logit|.",
        "--max-mean-logit-error",
    ),
    Key(
        "gates.min_speedup",
        {"type": ["number", "string"]},
        "Quantized over its float baseline on the same runtime: R or R@BATCH (batch 8).",
        "--min-speedup",
    ),
    Key("junit", _STR, "Write the gates as JUnit XML here.", "--junit"),
    Key(
        "out", _STR, "The run directory (default: out/NAME; `run --out DIR`: DIR/NAME)."
    ),  # --out, last
)

BY_PATH = {k.path: k for k in KEYS}
REQUIRED = ("model.name", "target")


def schema() -> dict:
    """The JSON Schema (Draft 2020-12) of a pipeline file, nested as the file is."""
    root: dict = {"type": "object", "properties": {}, "additionalProperties": False}
    for key in KEYS:
        node = root
        *parents, leaf = key.path.split(".")
        for part in parents:
            node = node["properties"].setdefault(
                part, {"type": "object", "properties": {}, "additionalProperties": False}
            )
        node["properties"][leaf] = {**key.schema, "description": key.help}
    for path in REQUIRED:
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            node = node["properties"][part]
        node.setdefault("required", []).append(leaf)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root}


def table(defaults: dict[str, object]) -> str:
    """The keys as a Markdown table, with the command's defaults (``{flag: default}``)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in KEYS:
        default = defaults.get(key.flag) if key.form in ("value", "list") else None
        shown = "required" if key.path in REQUIRED else ("" if default is None else f"`{default}`")
        rows.append(f"| `{key.path}` | {shown} | {key.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
