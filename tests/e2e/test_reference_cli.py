"""The CLI end to end on the shipped reference model, on real Fashion-MNIST test images."""

import hashlib
import json

import pytest

from tests.conftest import requires_fmnist, requires_trt
from tests.unit.test_cli_errors import run_cli

pytestmark = [pytest.mark.e2e, requires_fmnist]


@pytest.mark.parametrize("bits,target", [("w8a8", "ort"), ("w4a8", "trt")])
def test_cli_on_fmnist_vit(tmp_path, bits, target):
    out = tmp_path / "run"
    proc = run_cli(
        "fmnist_vit",
        "--bits",
        bits,
        "--target",
        target,
        "--eval-data",
        "fmnist",
        "--eval-limit",
        "1000",
        "--out",
        str(out),
        "--calib",
        "noise",
        "--no-engine",
    )
    assert proc.returncode == 0, proc.stderr
    assert "ort-qdq" in proc.stdout and "torch-fakequant" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["parity_inputs"] == {"source": "fmnist", "count": 1000, "labelled": True}
    backends = report["backends"]
    assert backends["torch-fp32"]["top1"] >= 0.88  # first 1000 test images
    assert backends["torch-fakequant"]["top1"] >= backends["torch-fp32"]["top1"] - 0.02
    assert backends["ort-fp32"]["top1"] == pytest.approx(backends["torch-fp32"]["top1"], abs=0.002)
    assert backends["ort-qdq"]["agreement"] >= 0.99
    assert set(report["skipped"]) == {"ort-cuda", "ort-trt", "trt", "trt-fp16"}
    for batch in ("1", "8", "32"):
        assert report["latency"][batch]["ort-qdq"]["speedup"]["over"] == "ort-fp32"
        assert report["latency"][batch]["ort-qdq"]["p50_ms"] > 0
    assert "| ort-qdq |" in (out / "report.md").read_text()
    err = backends["ort-qdq"]["logit_error"]
    assert err["cosine"] > 0.999 and err["mean_abs"] < 0.05
    assert report["config"]["bits"] == bits and report["versions"]["onnxruntime"]
    qp = json.loads((out / "qparams.json").read_text())
    assert qp["target"] == target and qp["metadata"]["weights"] == "bundled:fmnist_vit.safetensors"
    fp16 = ["model.fp16.onnx"] if target == "trt" else []  # the FP16 baseline engine's graph
    artifacts = [*fp16, "model.fp32.onnx", "model.qdq.onnx", "qparams.json"]
    artifacts += ["report.html", "report.json", "report.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *artifacts])
    manifest = json.loads((out / "manifest.json").read_text())
    assert {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in manifest["files"]
    } == {name: f["sha256"] for name, f in manifest["files"].items()}
    assert set(manifest["files"]) == set(artifacts)


@requires_trt
def test_cli_trt_builds_engine(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "fmnist_vit",
        "--bits",
        "w8a8",
        "--target",
        "trt",
        "--eval-data",
        "fmnist",
        "--eval-limit",
        "200",
        "--calib",
        "noise",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    artifacts = json.loads((out / "report.json").read_text())["artifacts"]
    engine, fp16 = artifacts["engine"], artifacts["fp16_engine"]
    assert engine["plan_bytes"] == (out / "model.engine").stat().st_size > 0
    assert fp16["plan_bytes"] == (out / "model.fp16.engine").stat().st_size > 0
    assert engine["strongly_typed"] is True and engine["profile"]["max"] == [32, 1, 28, 28]
    assert fp16["onnx"] == "model.fp16.onnx" and engine["onnx"] == "model.qdq.onnx"
    assert json.loads((out / "model.fp16.engine.json").read_text()) == fp16
    assert "engines" in proc.stdout and "model.fp16.engine" in proc.stdout  # the table


def test_full_clamp_pipeline_and_resume(tmp_path):
    """Stage 1 + Stage 2 through the CLI (fast presets), then --resume on the finished run."""
    out = tmp_path / "run"
    common = [
        "fmnist_vit",
        "--bits",
        "w4a8",
        "--target",
        "trt",
        "--calib",
        "clamp",
        "--synth-preset",
        "fast",
        "--search-preset",
        "fast",
        "--eval-data",
        "fmnist",
        "--eval-limit",
        "1000",
        "--no-engine",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    proc = run_cli(*common)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    meta = json.loads((out / "qparams.json").read_text())["metadata"]
    assert (
        meta["search"]["config"]["passes"] == 1
        and meta["calibration"]["synth"]["config"]["method"] == "clamp"
    )
    search = json.loads((out / "search.json").read_text())
    assert len(search["layers"]) == 32 and search["passes"][0]["fitness"] > 0
    assert report["backends"]["ort-qdq"]["agreement"] >= 0.99
    again = run_cli(*common, "--resume")
    assert again.returncode == 0, again.stderr
    assert "reusing cached synthetic set" in again.stderr
    other = run_cli(*[a if a != "w4a8" else "w8a8" for a in common], "--resume")
    assert other.returncode == 2 and "cannot resume" in other.stderr
