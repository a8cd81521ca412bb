"""Issue 23 (first part): backends by name, interleaved latency, gates and JUnit, report.md."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import pytest
import torch

from clamp_export.errors import UserError
from clamp_export.report.gates import GateResult, Gates, evaluate, junit_xml
from clamp_export.report.latency import Timing, summarize, time_interleaved
from clamp_export.runtime.backends import Backend, parse_backends
from tests.conftest import requires_fmnist
from tests.unit.test_cli_errors import assert_clean_error, run_cli


def test_latency_statistics_follow_trtexec_conventions():
    lat = summarize([float(v) for v in range(1, 101)], batch=8)
    assert (lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.min_ms, lat.runs) == (
        50.5,
        90.0,
        99.0,
        1.0,
        100,
    )
    assert lat.mean_ms == 50.5 and lat.images_per_s == pytest.approx(8000 / 50.5)


def test_interleaved_timing_gives_a_paired_speedup_over_the_baseline():
    def sleeper(ms):
        return lambda x: (time.sleep(ms / 1000), x)[1]

    backends = {
        "slow": Backend("slow", sleeper(6), None),
        "fast": Backend("fast", sleeper(2), "slow"),
    }
    out = time_interleaved(
        backends, 4, torch.zeros(4, 1), Timing(warmup=1, min_runs=8, min_seconds=0)
    )
    assert out["fast"]["runs"] == out["slow"]["runs"] == 8
    assert out["fast"]["speedup"]["over"] == "slow"
    assert 2.0 < out["fast"]["speedup"]["ratio"] < 4.0  # 6 ms / 2 ms, with sleep jitter
    assert "speedup" not in out["slow"]


def _report(top1, agreement, ratio, logit_error=0.02):
    return {
        "backends": {
            "torch-fp32": {"top1": 0.90, "agreement": 0.99, "logit_error": {"mean_abs": 0.1}},
            "torch-fakequant": {"top1": top1, "agreement": 1.0, "logit_error": {"mean_abs": 0}},
            "ort-qdq": {
                "top1": top1,
                "agreement": agreement,
                "logit_error": {"mean_abs": logit_error},
            },
        },
        "latency": {"8": {"ort-qdq": {"speedup": {"over": "ort-fp32", "ratio": ratio}}}},
    }


def test_gates_pass_and_fail_on_the_measured_values():
    gates = Gates(max_top1_drop=0.5, min_agreement=0.99, max_mean_logit_error=0.05, min_speedup=1.2)
    ok = evaluate(gates, _report(0.897, 0.995, 1.5))
    assert ok and all(g.passed for g in ok)
    assert {g.name for g in ok} == {
        "max-top1-drop[torch-fakequant]",
        "max-top1-drop[ort-qdq]",
        "min-agreement[ort-qdq]",
        "max-mean-logit-error[ort-qdq]",
        "min-speedup[ort-qdq@8]",
    }
    bad = {g.name: g for g in evaluate(gates, _report(0.88, 0.98, 1.1, 0.08)) if not g.passed}
    assert set(bad) == {
        "max-top1-drop[torch-fakequant]",
        "max-top1-drop[ort-qdq]",
        "min-agreement[ort-qdq]",
        "max-mean-logit-error[ort-qdq]",
        "min-speedup[ort-qdq@8]",
    }
    assert "mean |logit error| 0.08 (limit 0.05)" in bad["max-mean-logit-error[ort-qdq]"].message
    assert "2.00 pt below FP32 (limit 0.5)" in bad["max-top1-drop[ort-qdq]"].message
    xml = ET.fromstring(junit_xml([*bad.values(), GateResult("x", True, "fine")], "suite"))
    assert xml.get("tests") == "6" and xml.get("failures") == "5"
    assert len(xml.findall("testcase/failure")) == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_top1_drop": -1}, "--max-top1-drop -1 is impossible"),
        ({"min_agreement": 1.5}, "--min-agreement 1.5 is impossible"),
        ({"min_speedup": 0.0}, "--min-speedup 0.0 is impossible"),
    ],
)
def test_impossible_gates(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Gates(**kwargs)


def test_speedup_and_backend_parsing():
    assert Gates.parse_speedup("1.3@32") == (1.3, 32) and Gates.parse_speedup("2") == (2.0, 8)
    with pytest.raises(UserError, match="malformed --min-speedup"):
        Gates.parse_speedup("fast")
    assert parse_backends("ort-qdq, ort-fp32") == (("ort-qdq", "ort-fp32"), True)
    with pytest.raises(UserError, match="unknown --backends 'nope'"):
        parse_backends("ort-qdq,nope")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--min-agreement", "1.5"), "--min-agreement 1.5 is impossible"),
        (("--max-top1-drop", "-0.1"), "--max-top1-drop -0.1 is impossible"),
        (("--batch", "0"), "--batch 0 must list batch sizes of at least 1"),
        (("--batch", "1,x"), "malformed --batch '1,x'"),
        (("--min-speedup", "1.2@4"), "does not time it"),
        (
            ("--backends", "ort-cuda"),
            "backend ort-cuda cannot run here: onnxruntime has no CUDA",
        ),
    ],
)
def test_bad_report_options(tiny_weights, tmp_path, flags, needle):
    _, args = tiny_weights
    proc = run_cli(*args, "--calib", "noise", *flags, "--out", str(tmp_path / "o"))
    assert_clean_error(proc, needle)
    assert not (tmp_path / "o").exists()


def test_report_on_an_older_run_directory_says_what_to_rerun(tiny_weights, tmp_path):
    _, args = tiny_weights
    out = tmp_path / "o"
    assert run_cli(*args, "--calib", "noise", "--batch", "1", "--out", str(out)).returncode == 0
    (out / "model.fp32.onnx").unlink()
    assert_clean_error(run_cli("report", str(out)), "has no model.fp32.onnx", "clamp-export export")


@requires_fmnist
def test_a_failed_gate_exits_1_naming_it_and_writes_junit(tmp_path):
    out, junit = tmp_path / "o", tmp_path / "gates.xml"
    proc = run_cli(
        "fmnist_vit",
        "--bits",
        "w4a4",
        "--calib",
        "noise",
        "--eval-data",
        "fmnist",
        "--eval-limit",
        "500",
        "--backends",
        "torch-fp32,ort-qdq",
        "--batch",
        "1",
        "--max-top1-drop",
        "0",
        "--min-agreement",
        "0.9",
        "--junit",
        str(junit),
        "--out",
        str(out),
    )
    assert proc.returncode == 1, proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "gate failed" in line]
    assert failed and all(
        line.startswith("clamp-export: gate failed: max-top1-drop[") for line in failed
    )
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())  # the run is kept: it is the evidence
    assert set(report["backends"]) == {"torch-fakequant", "torch-fp32", "ort-qdq"}
    assert report["skipped"] == {}
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures")) == len(failed) and int(suite.get("tests")) == len(failed) + 1
    md = (out / "report.md").read_text()
    assert "| max-top1-drop[ort-qdq] | FAIL |" in md and "| min-agreement[ort-qdq] | pass |" in md


def test_logit_error_is_polygraphys_with_the_reference_second():
    from clamp_export.report.parity import logit_error

    ref = torch.linspace(-4, 4, 1000).reshape(100, 10)
    out = ref + torch.full_like(ref, 0.05)
    e = logit_error(out, ref, atol=0.01, rtol=0.01)
    assert e.max_abs == pytest.approx(0.05, abs=1e-6) and e.mean_abs == pytest.approx(
        0.05, abs=1e-6
    )
    assert e.p99_abs == pytest.approx(0.05, abs=1e-6) and e.cosine > 0.999
    assert not e.within_tol  # 0.05 is beyond both tolerances at most elements
    assert logit_error(out, ref, atol=0.06, rtol=0.0).within_tol


def test_eval_images_of_another_shape_are_refused(tiny_weights, tmp_path):
    _, args = tiny_weights
    from safetensors.torch import save_file

    data = tmp_path / "d.safetensors"
    save_file(
        {"images": torch.rand(4, 1, 28, 28), "labels": torch.zeros(4, dtype=torch.int64)}, str(data)
    )
    proc = run_cli(
        *args, "--calib", "noise", "--eval-data", str(data), "--out", str(tmp_path / "o")
    )
    assert_clean_error(proc, "are 1x28x28 (CxHxW) but the model takes 3x16x16")
    assert not (tmp_path / "o").exists()


def test_stored_outputs_are_reused_only_for_the_same_graph_images_and_threads(tmp_path):
    from clamp_export.report.outputs import backend_outputs
    from clamp_export.report.stage import ReportOptions

    calls = []

    def backend(name):
        def run(x):
            calls.append(name)
            return x.flatten(1)[:, :3] * (2 if name == "ort-qdq" else 1)

        return run

    graphs = {"qdq": tmp_path / "q.onnx", "float": tmp_path / "f.onnx"}
    graphs["qdq"].write_bytes(b"qdq graph")
    graphs["float"].write_bytes(b"float graph")
    ready = {n: backend(n) for n in ("torch-fp32", "ort-qdq")}
    x = torch.arange(24.0).reshape(4, 6)
    options = ReportOptions(store=str(tmp_path / "store"))

    def outputs(x=x, options=options):
        return backend_outputs(ready, x, graphs, "m", options, log=lambda m: None)

    first, reused = outputs()
    assert calls == ["torch-fp32", "ort-qdq"] and reused == {}
    again, reused = outputs()
    assert calls == ["torch-fp32", "ort-qdq"] and set(reused) == {"torch-fp32", "ort-qdq"}
    assert all(torch.equal(first[n], again[n]) for n in first)
    graphs["qdq"].write_bytes(b"qdq graph, one byte more")  # only the backends of that graph rerun
    _, reused = outputs()
    assert calls[2:] == ["ort-qdq"] and set(reused) == {"torch-fp32"}
    outputs(x=x + 1)  # other images
    outputs(options=ReportOptions(store=options.store, threads=1))  # other threads
    assert len(calls) == 7
    assert backend_outputs(ready, x, graphs, "m", ReportOptions(), log=print)[1] == {}  # no store
