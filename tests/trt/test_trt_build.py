"""TensorRT's real ONNX parser and builder accept our graphs (TensorRT-RTX builds on the CPU)."""

import pytest

from clamp_export.build.trt import BuildOptions, build_engine
from clamp_export.data.sources import load_images
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models import load_model
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.equalize import equalization_factors
from clamp_export.quant.fakequant import equalize_wrapped, quantizers, wrap_model
from clamp_export.quant.targets import get_profile
from tests.conftest import requires_fmnist, requires_trt

pytestmark = [pytest.mark.trt, requires_trt]


def _export(target: str, bits: str, path, equalize: bool = False, softmax: str = "uniform"):
    loaded = load_model("fmnist_vit")
    profile = get_profile(target)
    calib, _ = load_images("fmnist-train", loaded.preprocess, limit=32, shuffle=True)
    qm = wrap_model(loaded.model, BitsSpec.parse(bits), profile, softmax)
    if equalize:
        equalize_wrapped(qm, equalization_factors(loaded.model, calib))
    calibrate(qm, calib)
    if BitsSpec.parse(bits).mixed:  # widths as an allocation leaves them: 3..8 across layers
        for i, (_, _, q) in enumerate(quantizers(qm)):
            q.set_bits(3 + i % 6)
    return export_qdq(qm, loaded.preprocess.input_size, profile, path)


@requires_fmnist
# w4a4: Clip windows off-centre, LayerNorm/weights rewritten by the channel equalization, and the
# twin-uniform softmax output's Where split into two Q/DQ'd attn @ v matmuls
@pytest.mark.parametrize(
    "bits,equalize,softmax",
    [
        ("w8a8", False, "uniform"),
        ("w4a8", False, "uniform"),
        ("w4a4", True, "twin"),
        ("w4a16", False, "uniform"),  # INT4 weight-only: blocked int4 DequantizeLinear, opset 21
        ("mp:5x6", False, "uniform"),  # mixed precision: every point at its own width
    ],
)
def test_trt_profile_graph_parses_and_builds(tmp_path, bits, equalize, softmax):
    """Every trt graph of fmnist_vit; the FP16 baseline graph is built in test_engine_build."""
    proto = _export("trt", bits, tmp_path / "m.onnx", equalize, softmax)
    assert lint(proto, get_profile("trt")) == []
    res = build_engine(
        tmp_path / "m.onnx",
        tmp_path / "m.engine",
        input_shape=(1, 28, 28),
        options=BuildOptions(batches=(1, 8, 64)),
    )
    assert res["plan_bytes"] > 100_000
    assert (tmp_path / "m.engine").stat().st_size == res["plan_bytes"]
    assert res["strongly_typed"] and res["network_layers"] > 50
    assert res["profile"]["max"] == [64, 1, 28, 28]


@requires_fmnist
def test_asymmetric_ort_graph_is_rejected_by_lint(tmp_path):
    proto = _export("ort", "w8a8", tmp_path / "ort.onnx")
    rules = {v.rule for v in lint(proto, get_profile("trt"))}
    assert {"zero-point-0", "int8-only", "float-type"} <= rules
