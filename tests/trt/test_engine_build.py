"""The builder through Polygraphy (TensorRT-RTX on the CPU here): the build record, the FP16
baseline graph and engine, builder options refused before any work."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from clamp_export.build import trt as trt_build
from clamp_export.build.stage import build_stage
from clamp_export.build.trt import BuildOptions, build_engine, parse_compute_capabilities
from clamp_export.errors import UserError
from clamp_export.export.qdq import export_float
from tests.conftest import make_tiny, requires_trt

pytestmark = [pytest.mark.trt, requires_trt]


@pytest.fixture(scope="module")
def fp16_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "model.fp16.onnx"
    model = make_tiny()
    export_float(model, (3, 16, 16), path, torch.float16)
    return model, path


def test_fp16_baseline_graph_is_fp16_with_layernorm_one_node_and_matches_fp32(fp16_graph):
    model, path = fp16_graph
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LayerNormalization") == 2 * 2 + 1  # two per block, one final
    assert "ReduceMean" not in ops
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.randn(8, 3, 16, 16)
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy().astype("float16")})[0]
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(torch.from_numpy(got).float(), ref, atol=0.05 * ref.abs().max())


def test_build_record_says_what_was_built_how_and_for_what(fp16_graph, tmp_path):
    _, path = fp16_graph
    options = BuildOptions(
        batches=(2, 4, 16, 64),
        optimization_level=1,
        workspace_mb=64,
        compute_capabilities=((8, 9),),
    )
    record = build_stage(path, "trt", tmp_path, lambda m: None, options, baseline=True)
    assert (tmp_path / "model.engine").stat().st_size == record["plan_bytes"] > 10_000
    assert json.loads((tmp_path / "model.engine.json").read_text()) == record
    assert record["profile"] == {
        "input": "input",
        "min": [2, 3, 16, 16],
        "opt": [16, 3, 16, 16],  # the median of the sweep
        "max": [64, 3, 16, 16],
    }
    assert record["builder"] == {"optimization_level": 1, "workspace_mb": 64}
    assert record["onnx_sha256"] == trt_build.atomic.sha256_file(path)
    assert record["module"] == trt_build.available() and record["build_seconds"] > 0
    if record["module"] == "tensorrt_rtx":
        assert record["target"]["compute_capabilities"] == ["8.9"]
        assert record["timing_cache"] == {"skipped": trt_build.RTX_NO_TIMING_CACHE}
    if trt_build.gpu() is None:
        assert "need a GPU" in record["layers"]["skipped"]


def test_quantized_graph_is_linted_but_the_fp16_baseline_is_not(fp16_graph, tmp_path):
    _, path = fp16_graph
    with pytest.raises(UserError, match="breaks the trt rules"):
        build_stage(path, "trt", tmp_path, lambda m: None)  # a float graph is no deployment
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (BuildOptions(optimization_level=7), "must lie in 0..5"),
        (BuildOptions(workspace_mb=0), "must be at least 1"),
        (BuildOptions(batches=()), "at least 1"),
    ],
)
def test_impossible_builder_options_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        options.check()


def test_compute_capability_is_parsed_and_checked_against_tensorrt_rtx():
    assert parse_compute_capabilities("8.9, 12.0") == ((8, 9), (12, 0))
    with pytest.raises(UserError, match="malformed --compute-capability '89'"):
        parse_compute_capabilities("89")
    if trt_build.available() == "tensorrt_rtx":
        with pytest.raises(UserError, match=r"3\.5 is not one TensorRT-RTX .* choose from .*8\.9"):
            BuildOptions(compute_capabilities=((3, 5),)).check()


def test_parser_errors_are_one_line_user_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="parser rejected") as info:
        build_engine(bad, None, input_shape=(1, 28, 28))
    assert "\n" not in str(info.value)


def test_timing_caches_are_kept_per_flavour_version_and_gpu(tmp_path):
    a = trt_build.timing_cache_path(tmp_path, "tensorrt", "10.9", None)
    b = trt_build.timing_cache_path(
        tmp_path, "tensorrt", "10.9", {"name": "NVIDIA H200", "compute_capability": "9.0"}
    )
    c = trt_build.timing_cache_path(tmp_path, "tensorrt", "10.10", None)
    assert len({a, b, c}) == 3 and all(p.parent == tmp_path / "timing" for p in (a, b, c))
    assert b.name == "tensorrt-10.9-NVIDIA_H200-sm9.0.cache"


@pytest.mark.e2e  # a 224-px export and build (benchmarks/trt_build.py times all of them)
def test_deit_t_224_weight_only_graph_parses_and_builds(tmp_path):
    from clamp_export.data.sources import noise_images
    from clamp_export.export.qdq import export_qdq
    from clamp_export.models import load_model
    from clamp_export.quant.bits import BitsSpec
    from clamp_export.quant.calibrate import calibrate
    from clamp_export.quant.fakequant import wrap_model
    from clamp_export.quant.targets import get_profile

    torch.manual_seed(0)
    loaded = load_model("deit_t", random_init=True)
    qm = wrap_model(loaded.model, BitsSpec.parse("w4a16"), get_profile("trt"))  # 192 = 3 x 64
    calibrate(qm, noise_images(2, loaded.preprocess))
    export_qdq(qm, (3, 224, 224), get_profile("trt"), tmp_path / "model.qdq.onnx")
    record = build_stage(tmp_path / "model.qdq.onnx", "trt", tmp_path, lambda m: None)
    assert record["plan_bytes"] > 1_000_000 and record["profile"]["opt"] == [8, 3, 224, 224]
