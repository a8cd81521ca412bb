"""Pipeline files (issue 24): every bad input is one line naming file, line and key, exit 2,
nothing written; shipped pipelines parse into the one-shot command; the docs table is current."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clamp_export import cli, pipefile
from clamp_export.errors import UserError
from clamp_export.pipefile.source import parse

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))
GOOD = """\
model:
  name: fmnist_vit
bits: w4a8
target: trt
calibration:
  seed: 3
eval:
  data: fmnist
report:
  batches: [1, 8]
gates:
  min_agreement: 0.99
"""


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``clamp-export ARGS`` in this process (no interpreter start-up per case)."""
    monkeypatch.setattr(sys, "argv", ["clamp-export", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, text: str, name: str = "p.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(monkeypatch, capsys, tmp_path, text: str, *extra: str) -> str:
    """The one stderr line of a refused pipeline; asserts exit 2 and that no run started."""
    path = write(tmp_path, text)
    out_root = tmp_path / "runs"
    code, out, err = run_main(monkeypatch, capsys, "run", path, "--out", str(out_root), *extra)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("clamp-export: error: "), err
    assert not out_root.exists()
    return lines[0]


@pytest.mark.parametrize(
    "text, needles",
    [
        ("model: [fmnist_vit\nbits: w4a8\n", [":2: malformed YAML"]),  # the line it stops on
        (GOOD.replace("bits: w4a8", "bitz: w4a8"), [":3: unknown key 'bitz'", "'bits'"]),
        (GOOD.replace("  seed: 3", "  sede: 3"), [":6: unknown key 'calibration.sede'", "'seed'"]),
        (GOOD.replace("seed: 3", "seed: three"), [":6: calibration.seed must be an integer"]),
        (GOOD.replace("batches: [1, 8]", "batches: 8"), [":10: report.batches must be a list"]),
        (GOOD.replace("[1, 8]", "[1, 0]"), [":10: report.batches.1: 0 is less than"]),
        (GOOD.replace("target: trt\n", ""), ["missing required key 'target'"]),
        (
            GOOD.replace("  name: fmnist_vit", "  weights: random"),
            ["missing required key 'model.name'"],
        ),
        (GOOD.replace("bits: w4a8\n", ""), ["missing required key 'bits' (or budget_mb"]),
        (GOOD.replace("w4a8", "w9a8"), [":3: ", "w9a8"]),
        (
            GOOD.replace("target: trt", "target: tensorrt"),
            [":4: target 'tensorrt' is not one of ", "trt"],
        ),
        (
            GOOD.replace("fmnist_vit", "fmnist_vitt"),
            [":2: unknown model 'fmnist_vitt'", "fmnist_vit"],
        ),
        (GOOD + "bits: w8a8\n", [":13: duplicate key 'bits' (first on line 3)"]),
        (
            GOOD.replace("min_agreement: 0.99", "min_speedup: fast"),
            [":12: malformed --min-speedup"],
        ),
        (
            GOOD.replace("data: fmnist", "data: ${CLAMP_TEST_UNSET_VAR}"),
            [":8: eval.data reads ${CLAMP_TEST_UNSET_VAR}, which is not set"],
        ),
        (
            GOOD.replace("data: fmnist", "data: /nonexistent/val"),
            [":8: eval.data: /nonexistent/val not found"],
        ),
        (
            GOOD.replace("  name: fmnist_vit", "  name: fmnist_vit\n  weights: /no/w.safetensors"),
            [":3: weights file /no/w.safetensors not found"],
        ),
        (
            GOOD.replace("  name: fmnist_vit", "  name: fmnist_vit\n  weights: pretrained"),
            ["fmnist_vit has no timm pretrained weights"],
        ),
        (GOOD + "name: a/b\n", [":13: name 'a/b' may hold only"]),
        ("- model\n- bits\n", [":1: a pipeline is a mapping", "not a list"]),
        ("", ["empty pipeline file"]),
        ("# only a comment\n", ["empty pipeline file"]),
    ],
    ids=lambda v: v[0][:30] if isinstance(v, list) else None,
)
def test_bad_pipeline_is_one_line_with_file_and_line(monkeypatch, capsys, tmp_path, text, needles):
    line = refused(monkeypatch, capsys, tmp_path, text)
    assert str(tmp_path / "p.yaml") in line
    for needle in needles:
        assert needle in line, line


def test_unknown_set_key_suggests_the_dotted_key(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, tmp_path, GOOD, "--set", "calibration.sede=1")
    assert "--set calibration.sede=1: unknown key 'calibration.sede'" in line
    assert "did you mean 'calibration.seed'" in line


def test_set_value_of_the_wrong_type_names_the_set(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, tmp_path, GOOD, "--set", "calibration.size=many")
    assert "(--set calibration.size): calibration.size must be an integer, got 'many'" in line


def test_malformed_set(monkeypatch, capsys, tmp_path):
    assert "malformed --set 'bits'" in refused(monkeypatch, capsys, tmp_path, GOOD, "--set", "bits")


def test_unwritable_output_directory(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = write(tmp_path, GOOD + f"out: {blocker}/run\n")
    code, _, err = run_main(monkeypatch, capsys, "run", path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "p.yaml:13: " in err and str(blocker) in err
    assert blocker.read_text() == "x"


def test_missing_pipeline_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "run", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err.strip() == f"clamp-export: error: pipeline file {tmp_path / 'nope.yaml'} not found"


def test_a_bad_file_later_in_the_sequence_stops_everything_before_any_work(
    monkeypatch, capsys, tmp_path
):
    good = write(tmp_path, GOOD, "a.yaml")
    bad = write(tmp_path, GOOD.replace("bits: w4a8", "bitz: w4a8"), "b.yaml")
    code, out, err = run_main(monkeypatch, capsys, "run", good, bad, "--out", str(tmp_path / "r"))
    assert code == 2 and "b.yaml:3: unknown key 'bitz'" in err
    assert "==" not in err and not (tmp_path / "r").exists()


def test_two_pipelines_writing_one_directory_are_refused(monkeypatch, capsys, tmp_path):
    a = write(tmp_path, GOOD + "out: same\n", "a.yaml")
    b = write(tmp_path, GOOD + "out: same\n", "b.yaml")
    code, _, err = run_main(monkeypatch, capsys, "run", a, b)
    assert code == 2 and "a.yaml and" in err and "b.yaml both write same" in err


def test_options_the_command_refuses_are_refused_naming_the_file(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, tmp_path, GOOD + "budget_mb: 0.5\n")
    assert "p.yaml: --budget-mb chooses the weight bits itself" in line


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pipelines_check_and_print_their_command(monkeypatch, capsys, path):
    sets: tuple[str, ...] = ()
    if path.name.startswith("deit_s"):
        monkeypatch.setenv(
            "IMAGENET_VAL", str(ROOT)
        )  # any folder: the run, not the check, reads it
        sets = ("device=cpu",)  # it asks for a GPU, which this machine has not
    code, out, err = run_main(
        monkeypatch, capsys, "run", "--dry-run", str(path), *(a for s in sets for a in ("--set", s))
    )
    assert code == 0, err
    p = pipefile.load(str(path), sets)
    assert out.strip() == f"{path}: {p.command}"
    assert p.out == f"out/{path.stem}" and p.argv[-2:] == ("--out", p.out)
    assert "--min-agreement" in p.argv  # every shipped pipeline gates parity


def test_deit_pipeline_without_its_data_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("IMAGENET_VAL", raising=False)
    code, _, err = run_main(
        monkeypatch, capsys, "run", str(ROOT / "pipelines/deit_s-w4a8-trt.yaml")
    )
    assert code == 2
    assert "deit_s-w4a8-trt.yaml:15: eval.data reads ${IMAGENET_VAL}, which is not set" in err


def test_keys_become_the_commands_options(tmp_path):
    text = GOOD + "engine: false\n"
    text = text.replace("  name: fmnist_vit", "  name: fmnist_vit\n  args: {drop_rate: 0.0}")
    p = pipefile.load(write(tmp_path, text), sets=("calibration.seed=7", "report.batches=[2, 4]"))
    argv = list(p.argv)
    assert argv[0] == "fmnist_vit"
    pairs = dict(zip(argv, argv[1:], strict=False))  # each argument -> the one after it
    assert pairs["--bits"] == "w4a8" and pairs["--target"] == "trt"
    assert pairs["--seed"] == "7" and pairs["--batch"] == "2,4"  # --set wins over the file
    assert pairs["--model-arg"] == "drop_rate=0.0" and "--no-engine" in argv
    assert p.provenance["pipeline"]["sets"] == ["calibration.seed=7", "report.batches=[2, 4]"]
    assert len(p.provenance["pipeline"]["sha256"]) == 64
    # the command parses exactly as typed by hand, defaults included
    ctx = cli.quantize.make_context("quantize", argv)
    assert ctx.params["seed"] == 7 and ctx.params["calib_size"] == 32 and ctx.params["no_engine"]


@pytest.mark.parametrize(
    "setting, field, preset_value, value",
    [
        ("calibration.refine_loss=kl", "refine_loss", "logprob_mse", "kl"),
        ("calibration.refine_flip=true", "refine_flip", False, True),
    ],
)
def test_refinement_keys_reach_the_search_recipe(tmp_path, setting, field, preset_value, value):
    from clamp_export.pipeline import _recipe
    from clamp_export.quant.bits import BitsSpec

    text = GOOD.replace("bits: w4a8", "bits: w4a4")
    recipes = {}
    for sets in ((), (setting,)):
        argv = list(pipefile.load(write(tmp_path, text), sets=sets).argv)
        run = cli._run_config(cli.quantize.make_context("quantize", argv).params)
        recipes[sets] = _recipe(run, BitsSpec.parse("w4a4"), real=False).search
    assert getattr(recipes[()], field) == preset_value  # the preset's, below 8-bit activations
    assert getattr(recipes[(setting,)], field) == value
    assert recipes[()].refine_steps == recipes[(setting,)].refine_steps
    with pytest.raises(UserError, match=field):
        pipefile.load(write(tmp_path, text), sets=(f"calibration.{field}=mse",))


def test_env_default_and_out_root(tmp_path, monkeypatch):
    monkeypatch.delenv("CLAMP_TEST_UNSET_VAR", raising=False)
    text = GOOD.replace("data: fmnist", "data: ${CLAMP_TEST_UNSET_VAR:-fmnist}") + "name: mine\n"
    p = pipefile.load(write(tmp_path, text), out_root=str(tmp_path / "runs"))
    assert p.name == "mine" and p.out == str(tmp_path / "runs" / "mine")
    assert p.argv[p.argv.index("--eval-data") + 1] == "fmnist"


def test_every_key_sets_an_option_of_the_command():
    options = {o for param in cli.quantize.params for o in (*param.opts, *param.secondary_opts)}
    for key in pipefile.KEYS:
        flags = (key.flag or "").split("/")
        assert all(f in options for f in flags if f), key.path


def test_docs_table_is_current():
    docs = (ROOT / "docs" / "pipelines.md").read_text()
    assert docs.endswith(pipefile.table(cli._command_defaults()))


def test_lines_are_tracked_through_nesting():
    src = parse("a:\n  b:\n    - 1\n    - c: 2\n", "f.yaml")
    assert src.line(("a",)) == 1 and src.line(("a", "b", 1, "c")) == 4
    assert src.line(("a", "b", 0, "missing")) == 3  # the nearest parent
    with pytest.raises(UserError, match=r"f.yaml:3: duplicate key 'x'"):
        parse("x: 1\ny: 2\nx: 3\n", "f.yaml")


def test_deit_pipeline_without_reachable_weights_reports_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IMAGENET_VAL", str(tmp_path))
    args = ("run", str(ROOT / "pipelines/deit_s-w4a8-trt.yaml"), "--set", "device=cpu")
    code, out, err = run_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "r"))
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("clamp-export: error:")]
    assert len(errors) == 1 and "no pretrained weights for deit_small_patch16_224" in errors[0]
    assert "ERROR" in out.splitlines()[-1]  # the summary row
    assert not (tmp_path / "r" / "deit_s-w4a8-trt").exists()


def _tiny_pipeline(tmp_path, tiny_weights, gates: str) -> str:
    path, _ = tiny_weights
    return write(
        tmp_path,
        f"""\
model:
  name: vit_tiny_patch16_224
  weights: {path}
  num_classes: 5
  img_size: 16
  args: {{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}}
bits: w8a8
target: ort
calibration: {{size: 8, synth_preset: fast, search_preset: fast}}
report: {{batches: [1]}}
gates: {gates}
""",
        "tiny.yaml",
    )


def test_pipeline_runs_reruns_from_the_store_and_verifies(
    monkeypatch, capsys, tmp_path, tiny_weights
):
    monkeypatch.setenv("CLAMP_EXPORT_CACHE", str(tmp_path / "store"))
    path = _tiny_pipeline(tmp_path, tiny_weights, "{min_agreement: 0.5}")
    run_dir = tmp_path / "runs" / "tiny"
    for attempt in range(2):
        code, out, err = run_main(monkeypatch, capsys, "run", path, "--out", str(tmp_path / "runs"))
        assert code == 0, err
        assert ("reusing stored parameters" in err) == (attempt == 1)
        assert ("reusing stored outputs of torch-fakequant" in err) == (attempt == 1)
        row = out.splitlines()[-1].split()
        assert row[0] == "tiny" and "pass" in row and str(run_dir / "report.html") in row
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["pipeline"]["file"] == path and manifest["command"][1:3] == ["run", path]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["reused_outputs"]) >= {"torch-fakequant", "ort-qdq"}
    assert any("read from the store" in n for n in report["notes"])
    code, out, _ = run_main(monkeypatch, capsys, "verify", str(run_dir))
    assert code == 0 and "every artifact matches" in out


def test_failed_gate_exits_1_and_the_summary_says_fail(monkeypatch, capsys, tmp_path, tiny_weights):
    monkeypatch.setenv("CLAMP_EXPORT_CACHE", str(tmp_path / "store"))
    # a speed-up no CPU gives: on some CPUs ORT's QDQ graph matches fake-quant bit for bit, so a
    # zero logit-error limit is not a gate that always fails (test_report covers that gate)
    path = _tiny_pipeline(tmp_path, tiny_weights, "{min_speedup: '1000@1'}")
    code, out, err = run_main(monkeypatch, capsys, "run", path, "--out", str(tmp_path / "runs"))
    assert code == 1, err
    assert "FAIL 0/" in out.splitlines()[-1]
    assert "clamp-export: gate failed: tiny: min-speedup[ort-qdq@1]" in err
    assert (tmp_path / "runs" / "tiny" / "report.html").is_file()  # a failed gate still reports
