"""The TensorRT engine backends without a GPU: skipped in one line, refused when asked for,
engines from another TensorRT or GPU refused naming both; the inspector and trtexec parsers."""

from __future__ import annotations

import dataclasses

import pytest

from clamp_export.build.stage import precision_counts
from clamp_export.errors import UserError
from clamp_export.report.trtexec import summarize
from clamp_export.runtime import backends, engine


def test_engine_backends_are_skipped_without_a_gpu_or_tensorrt(monkeypatch):
    monkeypatch.setattr(engine.trt_build, "gpu", lambda: None)
    skipped = backends.unavailable(("trt", "trt-fp16", "ort-qdq"), asked=False, device="cpu")
    assert set(skipped) == {"trt", "trt-fp16"}
    why = skipped["trt"]
    assert "\n" not in why and ("needs a CUDA GPU" in why or "not installed" in why)
    with pytest.raises(UserError, match="backend trt cannot run here"):
        backends.unavailable(("trt",), asked=True, device="cpu")


def test_a_run_without_an_engine_skips_the_engine_backend_or_refuses_it(monkeypatch):
    spec = dataclasses.replace(backends.BACKENDS["trt"], missing=lambda d: None)
    monkeypatch.setitem(backends.BACKENDS, "trt", spec)  # as on a GPU machine with TensorRT
    arts = backends.Artifacts(None, None, None, None)
    ready, skipped = backends.open_backends(("trt",), False, arts)
    assert ready == {} and "no model.engine" in skipped["trt"]
    with pytest.raises(UserError, match="cannot run on this run directory: the run has no"):
        backends.open_backends(("trt",), True, arts)


@pytest.fixture
def gpu_machine(monkeypatch):
    monkeypatch.setattr(engine.trt_build, "available", lambda: "tensorrt")
    monkeypatch.setattr(
        engine.trt_build, "load_tensorrt", lambda name=None: type("M", (), {"__version__": "10.9"})
    )
    monkeypatch.setattr(
        engine.trt_build, "gpu", lambda: {"name": "NVIDIA L4", "compute_capability": "8.9"}
    )


def _record(**over):
    record = {
        "module": "tensorrt",
        "version": "10.9",
        "target": {
            "built_on_gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"},
            "compute_capabilities": None,
        },
    }
    return {**record, **over}


def test_an_engine_for_this_machine_fits(gpu_machine):
    engine.check_engine_fits(_record(), "model.engine")


@pytest.mark.parametrize(
    "record, needles",
    [
        (_record(version="10.4"), ["built by tensorrt 10.4", "this machine has tensorrt 10.9"]),
        (_record(module="tensorrt_rtx", version="1.7"), ["tensorrt_rtx 1.7", "tensorrt 10.9"]),
        (
            _record(target={"built_on_gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}}),
            ["built on NVIDIA H200 (compute capability 9.0)", "this GPU is NVIDIA L4 (8.9)"],
        ),
    ],
)
def test_an_engine_from_elsewhere_is_refused_naming_both(gpu_machine, record, needles):
    with pytest.raises(UserError) as info:
        engine.check_engine_fits(record, "model.engine")
    for n in needles:
        assert n in str(info.value)
    assert "clamp-export build" in str(info.value)


def test_rtx_engine_for_other_compute_capabilities_is_refused(monkeypatch, gpu_machine):
    monkeypatch.setattr(engine.trt_build, "available", lambda: "tensorrt_rtx")
    monkeypatch.setattr(
        engine.trt_build, "load_tensorrt", lambda name=None: type("M", (), {"__version__": "1.7"})
    )
    record = _record(
        module="tensorrt_rtx", version="1.7", target={"compute_capabilities": ["12.0", "9.0"]}
    )
    with pytest.raises(
        UserError, match=r"compute capabilities 12\.0, 9\.0, but this GPU \(NVIDIA L4\) is 8\.9"
    ):
        engine.check_engine_fits(record, "model.engine")


def test_precision_counts_from_the_inspector_json():
    info = {
        "Layers": [
            {"Name": "a", "Inputs": [{"Format/Datatype": "Row major linear Int8 format"}]},
            {"Name": "b", "Inputs": [{"Format/Datatype": "Channel major FP16 format where C % 8"}]},
            {"Name": "c", "Inputs": [{"Format/Datatype": "Row major linear Half format"}]},
            {"Name": "d", "Inputs": [{"Format/Datatype": "Int8 NC32HW32"}]},
            {"Name": "f", "Inputs": [{"Format/Datatype": "Row major linear Bool"}]},
            {"Name": "e", "Inputs": []},
            "names-only layer",
        ]
    }
    assert precision_counts(info) == {"Bool": 1, "FP16": 1, "Half": 1, "Int8": 2}


def test_trtexec_trace_summary():
    trace = [{"computeMs": 0.1 * (i + 1), "latencyMs": 0.2 * (i + 1)} for i in range(100)]
    got = summarize(trace)
    assert got["inferences"] == 100
    assert got["gpu_compute_p50_ms"] == pytest.approx(5.05)
    assert got["gpu_compute_p99_ms"] == pytest.approx(10.0)
    assert got["latency_p50_ms"] == pytest.approx(10.1)


def test_ort_tensorrt_ep_runs_fp16_and_caches_engines_in_the_run(tmp_path):
    arts = backends.Artifacts(None, None, None, None, engine_cache=tmp_path / "ort-trt-cache")
    (name, options), fallback = backends._ort_trt_providers(arts)
    assert (name, fallback) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert options == {
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "ort-trt-cache"),
    }
    assert (tmp_path / "ort-trt-cache").is_dir()
