"""Bad input: one line on stderr, exit code 2, no traceback, nothing half-written in --out."""

import json
import os
import subprocess
import sys

import torch

from tests.conftest import make_tiny


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clamp_export", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=900,  # generous: a loaded CI machine can be several times slower
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("clamp-export: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_written(out) -> None:
    if out.exists():
        assert [p.name for p in out.iterdir()] == []


def test_unknown_model_suggests(tmp_path):
    proc = run_cli("deit_smal", "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "unknown model 'deit_smal'", "did you mean", "deit_s")
    assert_nothing_written(tmp_path / "o")


def test_malformed_bits(tiny_weights, tmp_path):
    _, args = tiny_weights
    assert_clean_error(
        run_cli(*args, "--bits", "w4", "--out", str(tmp_path / "o")), "malformed --bits 'w4'"
    )


def test_negative_refine_steps(tiny_weights, tmp_path):
    _, args = tiny_weights
    assert_clean_error(
        run_cli(*args, "--refine-steps", "-1", "--out", str(tmp_path / "o")),
        "'--refine-steps': -1 is not in the range x>=0",
    )
    assert_nothing_written(tmp_path / "o")


def test_unknown_target(tiny_weights, tmp_path):
    _, args = tiny_weights
    assert_clean_error(
        run_cli(*args, "--target", "tpu", "--out", str(tmp_path / "o")),
        "unknown --target 'tpu'",
        "trt, ort",
    )


def test_unusable_device(tiny_weights, tmp_path):
    _, args = tiny_weights
    assert_clean_error(
        run_cli(*args, "--device", "tpu", "--out", str(tmp_path / "o")),
        "unknown --device 'tpu'",
        "cpu, cuda or cuda:N",
    )
    # no GPU here (or one GPU there): either way cuda:7 cannot be used
    assert_clean_error(run_cli(*args, "--device", "cuda:7", "--out", str(tmp_path / "o")), "cuda:7")
    synth = run_cli("synth", *args, "--device", "cuda:7", "--out", str(tmp_path / "o"))
    assert_clean_error(synth, "cuda:7")
    assert_nothing_written(tmp_path / "o")


def test_missing_weights(tmp_path):
    proc = run_cli(
        "fmnist_vit", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")
    )
    assert_clean_error(proc, "nope.safetensors not found")
    assert_nothing_written(tmp_path / "o")


def test_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    proc = run_cli("fmnist_vit", "--weights", str(bad), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "corrupt")
    assert_nothing_written(tmp_path / "o")


def test_mismatched_weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(make_tiny(num_classes=10).state_dict(), path)  # right classes, wrong architecture
    proc = run_cli("fmnist_vit", "--weights", str(path), "--out", str(tmp_path / "o"))
    assert_clean_error(
        proc, "another architecture", "embed dim 32 vs 128", "depth 2 vs 6", "input channels 3 vs 1"
    )
    assert_nothing_written(tmp_path / "o")


def test_num_classes_contradicts_weights(tiny_weights, tmp_path):
    _, args = tiny_weights
    args = [a if a != "5" else "9" for a in args]  # --num-classes 9 against 5-class weights
    assert_clean_error(
        run_cli(*args, "--out", str(tmp_path / "o")), "have 5 classes but the model has 9"
    )


def test_missing_eval_data_says_how_to_install(tiny_weights, tmp_path):
    _, args = tiny_weights
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(
        *args,
        "--eval-data",
        "fmnist",
        "--out",
        str(tmp_path / "o"),
        env={"CLAMP_EXPORT_FMNIST_ROOT": str(empty)},
    )
    assert_clean_error(proc, "apt-get install -y dataset-fashion-mnist")
    assert_nothing_written(tmp_path / "o")


def test_missing_calibration_data(tiny_weights, tmp_path):
    _, args = tiny_weights
    proc = run_cli(
        *args,
        "--calib",
        "real",
        "--calib-data",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(proc, "nowhere", "not found")


def test_unwritable_out(tiny_weights, tmp_path):
    _, args = tiny_weights
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(
        run_cli(*args, "--out", str(blocker / "sub")), "cannot be created", "not a directory"
    )


def test_lint_missing_and_non_onnx_file(tmp_path):
    assert_clean_error(run_cli("lint", str(tmp_path / "none.onnx")), "not found")
    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    assert_clean_error(run_cli("lint", str(junk)), "is not an ONNX model")


def test_qparams_violating_target(tiny_weights, tmp_path):
    _, args = tiny_weights
    ok = run_cli(
        *args,
        "--bits",
        "w8a8",
        "--target",
        "ort",
        "--calib",
        "noise",
        "--out",
        str(tmp_path / "ort"),
    )
    assert ok.returncode == 0, ok.stderr
    qp = tmp_path / "ort" / "qparams.json"
    assert json.loads(qp.read_text())["target"] == "ort"
    proc = run_cli(*args, "--target", "trt", "--qparams", str(qp), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "violate target 'trt'", "needs int8 levels")
    assert_nothing_written(tmp_path / "o")


def test_random_weights_contradicts_weights(tiny_weights, tmp_path):
    _, args = tiny_weights
    proc = run_cli(*args, "--random-weights", "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "--random-weights and --weights contradict")
    assert_nothing_written(tmp_path / "o")
