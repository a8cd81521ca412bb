"""A pipeline file checked, down to the line of each error, and turned into its command line.

Everything here is cheap: a file is checked before any pipeline starts, so a typo in the third
file of a sequence is found before the first one spends minutes on a search.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from clamp_export.atomic import check_creatable_dir
from clamp_export.errors import UserError
from clamp_export.pipefile.keys import BY_PATH, KEYS, schema
from clamp_export.pipefile.source import Source, read

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_VALIDATOR = jsonschema.Draft202012Validator(schema())
_FREE_FORM = "model.args"  # its keys are timm's, not ours


@dataclass(frozen=True)
class Pipeline:
    file: str
    name: str
    out: str
    argv: tuple[str, ...]  # the arguments of ``clamp-export MODEL ...`` it runs
    provenance: dict = field(default_factory=dict)  # recorded in the run's manifest

    @property
    def command(self) -> str:
        return shlex.join(["clamp-export", *self.argv])


def load(path: str, sets: tuple[str, ...] = (), out_root: str | None = None) -> Pipeline:
    """The pipeline in ``path`` with ``--set KEY=VALUE`` overrides applied, fully checked."""
    src = read(path)
    if src.data is None:
        raise UserError(f"{path}: empty pipeline file; it needs at least model.name and target")
    if not isinstance(src.data, dict):
        raise UserError(
            f"{path}:1: a pipeline is a mapping of keys (model, bits, target, ...), "
            f"not a {type(src.data).__name__}"
        )
    for item in sets:
        _apply_set(src, item)
    _expand_env(src, src.data, ())
    _validate(src)
    data = src.data
    _check_values(src)
    name = data.get("name") or Path(path).stem
    if out_root is not None:
        out = str(Path(out_root) / name)
    else:
        out = data.get("out") or str(Path("out") / name)
    try:
        check_creatable_dir(out, "out")
    except UserError as e:
        raise src.error(("out",), str(e)) from None
    argv = [data["model"]["name"]]
    for key in KEYS:
        value = _get(data, key.path)
        if value is not None:
            argv += key.argv(value)
    argv += ["--out", out]
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    provenance = {"file": path, "sha256": digest, "sets": list(sets), "argv": argv}
    return Pipeline(path, name, out, tuple(argv), {"pipeline": provenance})


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply_set(src: Source, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    known = key in BY_PATH or (key.startswith(_FREE_FORM + ".") and key != _FREE_FORM + ".")
    if not sep or not key:
        raise UserError(f"malformed --set {item!r}: expected KEY=VALUE, e.g. calibration.seed=1")
    if not known:
        raise UserError(f"--set {item}: unknown key {key!r}{_suggest(key, BY_PATH)}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {item}: malformed value {text!r}") from None
    *parents, leaf = key.split(".")
    node, path = src.data, ()
    for part in parents:
        path = (*path, part)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    src.lines[(*path, leaf)] = f"--set {key}"


def _expand_env(src: Source, node, path: tuple) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _expand_env(src, v, (*path, k))
        elif isinstance(v, str) and "${" in v:
            node[k] = _ENV.sub(lambda m, p=(*path, k): _env_value(src, p, m), v)


def _env_value(src: Source, path: tuple, m: re.Match) -> str:
    value = os.environ.get(m.group(1)) or m.group(2)
    if value is None:
        dotted = ".".join(map(str, path))
        raise src.error(
            path,
            f"{dotted} reads ${{{m.group(1)}}}, which is not set; export it, or pass "
            f"--set {dotted}=VALUE",
        )
    return value


def _validate(src: Source) -> None:
    errors = list(_VALIDATOR.iter_errors(src.data))
    if not errors:
        return

    def line_of(e: jsonschema.ValidationError) -> int:
        line = src.line(tuple(e.absolute_path))
        return line if isinstance(line, int) else 0  # a --set value: before the file's lines

    first = min(errors, key=line_of)
    path = tuple(first.absolute_path)
    dotted = ".".join(map(str, path))
    if first.validator == "additionalProperties":
        allowed = first.schema.get("properties", {})
        unknown = sorted(set(first.instance) - set(allowed))[0]
        where = f"{dotted}." if dotted else ""
        raise src.error(
            (*path, unknown),
            f"unknown key {where + unknown!r}{_suggest(unknown, allowed)}; "
            "`clamp-export run --keys` lists them",
        )
    if first.validator == "required":
        missing = first.message.split("'")[1]
        raise src.error(
            path, f"missing required key {(dotted + '.' if dotted else '') + missing!r}"
        )
    if first.validator == "enum":
        choices = first.validator_value
        raise src.error(
            path,
            f"{dotted} {first.instance!r} is not one of {', '.join(choices)}"
            f"{_suggest(str(first.instance), choices)}",
        )
    if first.validator == "type":
        wanted = first.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        raise src.error(path, f"{dotted} must be {_article(wanted)}, got {first.instance!r}")
    if first.validator == "pattern":  # only name has one: it becomes a folder
        raise src.error(
            path, f"{dotted} {first.instance!r} may hold only letters, digits, '.', '_' and '-'"
        )
    raise src.error(path, f"{dotted or 'the file'}: {first.message}")


def _article(kind: str) -> str:
    names = {"object": "a mapping", "array": "a list", "integer": "an integer"}
    return names.get(kind, f"a {kind}")


def _check_values(src: Source) -> None:
    """What the schema cannot say: the bits grammar, the gate syntax, the weights."""
    from clamp_export.data.sources import FMNIST_NAMES
    from clamp_export.models.registry import resolve
    from clamp_export.quant.bits import BitsSpec
    from clamp_export.report.gates import Gates

    data = src.data
    if "bits" not in data and "budget_mb" not in data:
        raise src.error((), "missing required key 'bits' (or budget_mb for mixed precision)")
    for path, check in (
        (("bits",), lambda v: BitsSpec.parse(v)),
        (("gates", "min_speedup"), lambda v: Gates.parse_speedup(str(v))),
    ):
        value = _get(data, ".".join(path))
        if value is not None:
            try:
                check(value)
            except UserError as e:
                raise src.error(path, str(e)) from None
    weights = _get(data, "model.weights")
    try:
        spec = resolve(data["model"]["name"])
    except UserError as e:
        raise src.error(("model", "name"), str(e)) from None
    if weights == "pretrained" and spec.bundled_weights:
        raise src.error(
            ("model", "weights"),
            f"{data['model']['name']} has no timm pretrained weights; leave model.weights out "
            "to use the weights it ships with",
        )
    if weights not in (None, "pretrained", "random") and not Path(weights).is_file():
        raise src.error(("model", "weights"), f"weights file {weights} not found")
    for path in (("eval", "data"), ("calibration", "data")):
        value = _get(data, ".".join(path))
        if value is not None and value not in FMNIST_NAMES and not Path(value).exists():
            raise src.error(
                path,
                f"{'.'.join(path)}: {value} not found (fmnist, fmnist-train, an IDX folder, an "
                "image class-folder or a tensor file)",
            )
