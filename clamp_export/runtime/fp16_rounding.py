"""An FP16 graph as ONNX Runtime's CPU EP should run it: FP32 kernels, every FP16 tensor rounded.

The CPU EP has few FP16 kernels. Its InsertCastTransformer runs the rest in FP32 and drops the
casts between them, so most of an FP16 graph (the residual stream, the GELU, the attention
logits) is computed in FP32 and rounded only where an FP16 kernel reads it. That is not the
graph's arithmetic. On ``fmnist_vit_reg4`` W4A4 the fake-quant model and that session agreed on
only 97.8% of the test images, and TensorRT runs the FP16 types the graph declares.

``explicit_fp16(proto)`` gives a copy whose float tensors are FP32 and whose every FP16 tensor
passes through Cast(FLOAT16) → Cast(FLOAT): the CPU EP then computes each op in FP32 and rounds
its result once, as the typed graph says. Two exceptions, both where TensorRT fuses:
DequantizeLinear outputs stay exact (the integer matmul that consumes them never materializes
them), and ops that only move data need no rounding (their input is rounded already).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

# ops whose float output equals some of their float inputs' values: rounding them changes nothing
_DATA_MOVEMENT = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Split",
    "Gather",
    "Slice",
    "Concat",
    "Expand",
    "Flatten",
    "Identity",
    "Clip",  # its bounds are FP16 values
    "Where",
    "Max",
    "Min",
    "ReduceMax",
}
# the integer matmul consumes it exact; a Q output is an integer
_NOT_ROUNDED = _DATA_MOVEMENT | {"DequantizeLinear", "QuantizeLinear"}
_F16, _F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _to_fp32(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name)


def is_fp16_graph(proto: onnx.ModelProto) -> bool:
    return proto.graph.input[0].type.tensor_type.elem_type == _F16


def explicit_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an FP16 graph in FP32 with explicit FP16 rounding; input and outputs stay FP16."""
    typed = onnx.shape_inference.infer_shapes(proto)
    fp16_values = {
        v.name
        for v in list(typed.graph.value_info) + list(typed.graph.output)
        if v.type.tensor_type.elem_type == _F16
    }
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    for init in g.initializer:
        if init.data_type == _F16:
            init.CopyFrom(_to_fp32(init))
    inp, outputs = g.input[0].name, [o.name for o in g.output]
    rename = {v: f"{v}__f32" for v in [inp, *outputs]}  # FP32 inside, FP16 at both ends
    fp16_values = {rename.get(v, v) for v in fp16_values}
    nodes = [helper.make_node("Cast", [inp], [rename[inp]], to=_F32)]
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _F16:
                a.t.CopyFrom(_to_fp32(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == _F16:
                a.i = _F32  # the rounding follows below, as for any FP16 result
        nodes.append(node)
        if node.op_type in _NOT_ROUNDED:
            continue
        for k, name in enumerate(node.output):
            if name in fp16_values:
                node.output[k] = f"{name}__exact"
                nodes.append(helper.make_node("Cast", [node.output[k]], [f"{name}__f16"], to=_F16))
                nodes.append(helper.make_node("Cast", [f"{name}__f16"], [name], to=_F32))
    nodes += [helper.make_node("Cast", [rename[o]], [o], to=_F16) for o in outputs]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return out
