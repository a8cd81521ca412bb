"""The `trt` fake-quant model computes what its FP16 graph computes, rounding for rounding."""

import onnx
import pytest
import torch
from torch import nn

from clamp_export.data.sources import noise_images
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.fp16 import GraphGELU
from clamp_export.quant.targets import get_profile
from clamp_export.runtime.fp16_rounding import explicit_fp16
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from tests.conftest import make_tiny

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))


def _trt_graph(model, bits, tmp_path, softmax="uniform"):
    profile = get_profile("trt")
    qm = wrap_model(model, BitsSpec.parse(bits), profile, softmax)
    qm = calibrate(qm, noise_images(16, PRE, 0))
    path = tmp_path / f"{bits}-{softmax}.onnx"
    return qm, export_qdq(qm, PRE.input_size, profile, path), path


@pytest.mark.parametrize(
    "bits,softmax",
    [("w8a8", "uniform"), ("w4a8", "uniform"), ("w4a4", "uniform"), ("w4a4", "twin")],
)
def test_trt_fake_quant_equals_its_fp16_graph(tmp_path, bits, softmax):
    """With 4 register tokens (5 prefix tokens). Nearly every logit is bit-identical: a matmul's
    FP32 summation order may still move one FP16 rounding, and with it a level downstream. Rounding
    only the Q inputs left 2% of the logits identical at W8A8 and 0% at W4A4."""
    qm, _, path = _trt_graph(make_tiny(reg_tokens=4), bits, tmp_path, softmax)
    x = noise_images(128, PRE, seed=7)
    ref, out = TorchRunner(qm, "fq")(x), OrtRunner(path)(x)
    assert (out == ref).float().mean() > 0.95
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_explicit_rounding_copy_keeps_the_interface_and_rounds_each_result(tiny_vit, tmp_path):
    _, proto, _ = _trt_graph(tiny_vit, "w4a4", tmp_path)
    assert not any(n.op_type == "Cast" for n in proto.graph.node)  # emulation writes no node
    x = explicit_fp16(proto)
    onnx.checker.check_model(x, full_check=True)
    f16 = onnx.TensorProto.FLOAT16
    assert x.graph.input[0].type.tensor_type.elem_type == f16
    assert x.graph.output[0].type.tensor_type.elem_type == f16
    assert not any(i.data_type == f16 for i in x.graph.initializer)
    producer = {o: n for n in x.graph.node for o in n.output}
    down = [n for n in x.graph.node if n.op_type == "Cast" and n.attribute[0].i == f16]
    rounded = {producer[n.input[0]].op_type for n in down if n.input[0] in producer}
    # every arithmetic op rounds its result; DequantizeLinear feeds its matmul exact
    assert {
        "Conv",
        "MatMul",
        "Add",
        "Mul",
        "Div",
        "Erf",
        "Softmax",
        "LayerNormalization",
    } <= rounded
    assert "DequantizeLinear" not in rounded and "Reshape" not in rounded
    up = [n for n in x.graph.node if n.op_type == "Cast" and n.attribute[0].i != f16]
    assert len(up) == len(down)  # each rounding a down-and-up pair; the input up, the output down


def test_graph_gelu_rounds_each_op_of_the_decomposition():
    x = torch.linspace(-6, 6, 20001)
    g = GraphGELU()(x)
    assert torch.equal(g, g.half().float())
    # one rounding of the exact GELU is a different function: the decomposition's steps show
    assert not torch.equal(g, nn.functional.gelu(x).half().float())
    assert (g - nn.functional.gelu(x)).abs().max() < 1e-2
    assert torch.equal(GraphGELU()(x.half()), nn.functional.gelu(x.half()))  # traced as is


def test_ort_profile_keeps_fp32_arithmetic(tiny_vit, tmp_path):
    qm = wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("ort"))
    assert type(qm.blocks[0]).__name__ == "Block"
    assert type(qm.blocks[0].mlp.act) is nn.GELU
    qt = wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("trt"))
    assert type(qt.blocks[0]).__name__ == "FP16Block"
    assert isinstance(qt.blocks[0], type(qm.blocks[0]))  # the equalization's layout check holds
    assert qt.state_dict().keys() == qm.state_dict().keys()  # qparams and weights by the same names
