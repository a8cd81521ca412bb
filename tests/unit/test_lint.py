import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clamp_export.data.sources import noise_images
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
TRT = get_profile("trt")


@pytest.fixture
def trt_graph(tiny_vit, tmp_path) -> onnx.ModelProto:
    qm = calibrate(wrap_model(tiny_vit, BitsSpec.parse("w8a8"), TRT), noise_images(8, PRE))
    return export_qdq(qm, PRE.input_size, TRT, tmp_path / "m.onnx")


def _const_value(graph: onnx.GraphProto, name: str):
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n
    return None


def test_clean_graph_passes(trt_graph):
    assert lint(trt_graph, TRT) == []


def test_planted_nonzero_zero_point_is_caught(trt_graph):
    q = next(n for n in trt_graph.graph.node if n.op_type == "QuantizeLinear" and "fc1" in n.name)
    const = _const_value(trt_graph.graph, q.input[2])
    const.attribute[0].t.CopyFrom(
        numpy_helper.from_array(np.array(5, dtype=np.int8), const.output[0])
    )
    found = lint(trt_graph, TRT)
    # the Q and its DQ share the constant: both are reported, nothing else is
    dq = next(
        n
        for n in trt_graph.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]
    )
    assert {(v.node, v.rule) for v in found} == {
        (q.name, "zero-point-0"),
        (dq.name, "zero-point-0"),
    }
    assert all("zero-point 5" in v.message for v in found)


def test_wrong_weight_axis_and_float_type_are_caught(trt_graph):
    dq = next(
        n
        for n in trt_graph.graph.node
        if n.op_type == "DequantizeLinear"
        and any(i.name == n.input[0] for i in trt_graph.graph.initializer)
        and "qkv" in n.name
    )
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 0
    found = lint(trt_graph, TRT)
    assert any(
        v.rule == "weight-axis" and v.node == dq.name and "needs axis 1" in v.message for v in found
    )
    assert any(v.rule == "float-type" for v in lint(trt_graph, get_profile("ort")))


def test_integer_ops_uint8_and_decomposed_layernorm_are_caught():
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="ln_mean"),
        helper.make_node("Sub", ["x", "m"], ["c"], name="ln_centre"),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_u8"),
        helper.make_node("MatMulInteger", ["q", "q"], ["y"], name="mmi"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 4])],
        [
            helper.make_tensor("s", TensorProto.FLOAT16, [], [0.1]),
            helper.make_tensor("z", TensorProto.UINT8, [], [0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    rules = {(v.node, v.rule) for v in lint(model, TRT)}
    assert rules == {
        ("ln_mean", "single-layernorm"),
        ("q_u8", "int8-only"),
        ("mmi", "no-integer-ops"),
    }
