"""The run's TensorRT engines through the report backends (runs where a CUDA GPU and TensorRT
are; skipped here, where TensorRT-RTX only builds): outputs agree with fake-quant, the FP16
engine is the baseline, the inspector counts INT8 layers, a corrupt engine is one line."""

from __future__ import annotations

import json

import pytest
import torch

from clamp_export.build import trt as trt_build
from clamp_export.errors import UserError
from clamp_export.runtime.engine import EngineRunner
from tests.conftest import requires_fmnist, requires_trt
from tests.unit.test_cli_errors import run_cli

pytestmark = [
    pytest.mark.gpu,
    requires_trt,
    requires_fmnist,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    args = ("fmnist_vit", "--bits", "w8a8", "--target", "trt", "--calib", "noise")
    more = ("--eval-data", "fmnist", "--eval-limit", "2000", "--backends", "trt,trt-fp16")
    proc = run_cli(*args, *more, "--min-agreement", "0.99", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_engines_run_agree_and_are_timed_against_fp16(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["backends"]["trt"]["agreement"] >= 0.99
    assert report["backends"]["trt-fp16"]["top1"] >= 0.88
    assert report["latency"]["8"]["trt"]["speedup"]["over"] == "trt-fp16"
    counts = report["artifacts"]["engine"]["layers"]["counts"]
    assert counts.get("Int8", 0) > 0, counts


def test_a_corrupt_engine_is_one_line(run_dir, tmp_path):
    record = json.loads((run_dir / "model.engine.json").read_text())
    bad = tmp_path / "model.engine"
    bad.write_bytes((run_dir / "model.engine").read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot run") as info:
        EngineRunner(bad, record)
    assert "\n" not in str(info.value) and trt_build.available() in {"tensorrt", "tensorrt_rtx"}
