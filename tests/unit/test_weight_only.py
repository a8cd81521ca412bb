"""INT4 weight-only (w4a16): blocked int4 weights in the fake-quant model and in the graph, the
lint rules TensorRT documents, the qparams contract, and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import collect_qparams, load_qparams, quantizers, wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import get_profile
from tests.conftest import make_tiny
from tests.unit.test_cli_errors import assert_clean_error, assert_nothing_written, run_cli

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
TRT = get_profile("trt")


def _model():
    return make_tiny(embed_dim=64)  # 64 input channels: one block of 64 per qkv / fc1 row


@pytest.fixture(scope="module")
def w4a16():
    model = _model()
    qm = calibrate(
        wrap_model(model, BitsSpec.parse("w4a16").with_block(64), TRT), noise_images(8, PRE)
    )
    return model, qm


def test_bits_spec():
    b = BitsSpec.parse("w4a16")
    assert (b.weight, b.act, b.edge, b.weight_only, str(b)) == (4, 16, 16, True, "w4a16")
    assert "block" not in BitsSpec.parse("w4a8").to_dict()  # older recipe keys unchanged
    with pytest.raises(UserError, match="weight-only quantization is w4a16"):
        BitsSpec.parse("w8a16")
    with pytest.raises(UserError, match="blocks of 64 or 128"):
        b.with_block(32)


def test_only_the_block_linears_weights_are_quant_points(w4a16):
    _, qm = w4a16
    points = [(m, r, q.block, q.bits) for m, r, q in quantizers(qm)]
    assert len(points) == 4 * 2  # qkv, proj, fc1, fc2 of two blocks; no activation, no edge
    assert {(r, b, bits) for _, r, b, bits in points} == {("weight", 64, 4)}


def test_fake_quant_weight_is_symmetric_int4_per_block_of_k(w4a16):
    _, qm = w4a16
    layer = qm.blocks[0].mlp.fc2  # [64, 256]: 4 blocks per output channel
    w = layer.weight.detach()
    got = layer.weight_q(w)
    blocks = w.reshape(64, 4, 64)
    scale = (blocks.abs().amax(-1, keepdim=True) / 7).half().float()  # min-max, FP16-stored
    want = (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).reshape(64, 256)
    assert layer.weight_q.scale.shape == (64 * 4,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_graph_is_int4_blocked_dq_at_opset_21_without_activation_qdq(w4a16, tmp_path):
    model, qm = w4a16
    proto = export_qdq(qm, (3, 16, 16), TRT, tmp_path / "m.onnx")
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 8 and not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    inits = {i.name: i for i in proto.graph.initializer}
    for n in dqs:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 64}
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        k, out = inits[n.input[0]].dims
        assert list(inits[n.input[1]].dims) == [k // 64, out]
    assert lint(proto, TRT) == []
    x = noise_images(16, PRE, seed=3)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(
        None, {"input": x.numpy().astype(np.float16)}
    )[0]
    with torch.no_grad():
        ref = qm(x)
    assert torch.allclose(torch.from_numpy(got).float(), ref, atol=0.02 * ref.abs().max())


def _set_block(proto, block: int):
    for n in proto.graph.node:
        for a in n.attribute:
            if a.name == "block_size":
                a.i = block


@pytest.mark.parametrize(
    "edit, rule",
    [
        (lambda p: _set_block(p, 32), "block-size"),
        (
            lambda p: [
                setattr(a, "i", 1) for n in p.graph.node for a in n.attribute if a.name == "axis"
            ],
            "block-axis",
        ),
        (
            lambda p: p.graph.node.append(
                helper.make_node("QuantizeLinear", ["input", "s"], ["q"])
            ),
            "weight-only",
        ),
    ],
    ids=["block-32", "blocks-along-N", "activation-Q"],
)
def test_lint_refuses_what_tensorrt_does_not_document(w4a16, tmp_path, edit, rule):
    _, qm = w4a16
    proto = copy.deepcopy(export_qdq(qm, (3, 16, 16), TRT, tmp_path / "m.onnx"))
    edit(proto)
    assert rule in {v.rule for v in lint(proto, TRT)}


def test_blocked_qparams_round_trip_and_refusals(w4a16, tmp_path):
    model, qm = w4a16
    qp = collect_qparams(qm, model="vit_tiny_patch16_224", target="trt", bits="w4a16")
    qp.save(tmp_path / "q.json")
    back = QParams.load(tmp_path / "q.json")
    assert back.get("blocks.0.mlp.fc2", "weight").block == 64
    again = load_qparams(wrap_model(model, BitsSpec.parse("w4a16"), TRT), back)
    x = noise_images(4, PRE, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(again(x), qm(x), rtol=0, atol=0)
    bad = QParams.from_dict(qp.to_dict())
    bad.get("blocks.0.mlp.fc2", "weight").block = 32
    assert any("block size 32" in v for v in bad.violations(TRT))
    assert any("TensorRT's format" in v for v in back.violations(get_profile("ort")))


def test_a_layer_the_block_does_not_divide_is_refused():
    with pytest.raises(UserError, match="32 input channels does not split into INT4 blocks of 64"):
        wrap_model(make_tiny(), BitsSpec.parse("w4a16").with_block(64), TRT)  # embed dim 32


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--bits", "w4a16", "--target", "ort"), "is TensorRT's format: use --target trt"),
        (("--bits", "w4a16", "--target", "trt", "--block-size", "32"), "--block-size 32"),
        (("--bits", "w8a16", "--target", "trt"), "weight-only quantization is w4a16"),
    ],
)
def test_cli_refuses_weight_only_it_cannot_run(tiny_weights, tmp_path, args, needle):
    _, model_args = tiny_weights
    proc = run_cli(*model_args, *args, "--calib", "noise", "--out", str(tmp_path / "o"))
    assert_clean_error(proc, needle)
    assert_nothing_written(tmp_path / "o")
