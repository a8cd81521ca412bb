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

A MatMul or Conv of two DequantizeLinear outputs runs on their integers (MatMulInteger /
ConvInteger, then one FP32 scale and bias): the INT8 kernel TensorRT runs there, with its exact
int32 sum. The fake-quant model computes the same (``quant.math.integer_product``); a float
kernel's summation order differs from torch's and moves a 4-bit level now and then.
"""

from __future__ import annotations

import numpy as np
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


def _constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


# the float ops TensorRT runs as INT8 kernels when both operands are dequantized, and the axis
# of the second operand (a constant weight) that may carry one scale per output channel: a
# MatMul's last (its columns), a Conv's first
_INTEGER_OPS = {"MatMul": ("MatMulInteger", -1), "Conv": ("ConvInteger", 0)}


def _integer_kernels(g: onnx.GraphProto) -> None:
    """Run every MatMul / Conv of two dequantized operands on their integers, in place.

    ``op(DQ(qa), DQ(qb)[, bias])`` becomes ``Cast(opInteger(qa, qb)) * (sa * sb) [+ bias]``,
    the exact int32 sum scaled in one FP32 epilogue, as ``quant.math.integer_product`` computes.
    A DequantizeLinear left without consumers goes, with its constants.
    """
    consts = _constants(g)
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}

    def operand(name: str, channel_axis: int | None) -> tuple[str, str, np.ndarray] | None:
        """(integers, zero-point or "", scale) of a dequantized operand with a scale the
        epilogue can apply: one scalar, or one per output channel of a constant weight."""
        n = dq.get(name)
        if n is None or n.input[1] not in consts:
            return None
        scale = consts[n.input[1]].astype(np.float32)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            weight = consts.get(n.input[0])
            if (
                weight is None
                or channel_axis is None
                or axis % weight.ndim != channel_axis % weight.ndim
            ):
                return None
        zp = n.input[2] if len(n.input) > 2 else ""
        if zp in consts and not consts[zp].any():  # ConvInteger takes no per-channel zeros
            zp = ""
        return n.input[0], zp, scale

    nodes, added = [], []
    for n in g.node:
        integer_op, channel_axis = _INTEGER_OPS.get(n.op_type, (None, None))
        a = operand(n.input[0], None) if integer_op else None
        b = operand(n.input[1], channel_axis) if a else None
        if b is None:
            nodes.append(n)
            continue
        (qa, za, sa), (qb, zb, sb) = a, b
        y, bias = n.output[0], n.input[2] if len(n.input) > 2 else ""
        scale = sa * sb  # two FP16 values: their FP32 product is exact
        if n.op_type == "Conv":  # one scale per output channel of [N, C, H, W]
            scale = scale.reshape(-1, 1, 1)
        added.append(numpy_helper.from_array(scale, f"{y}__scale"))
        kernel = helper.make_node(integer_op, [qa, qb, za, zb], [f"{y}__int32"])
        kernel.attribute.extend(n.attribute)
        scaled = f"{y}__scaled" if bias else y
        nodes += [
            kernel,
            helper.make_node("Cast", [f"{y}__int32"], [f"{y}__acc"], to=_F32),
            helper.make_node("Mul", [f"{y}__acc", f"{y}__scale"], [scaled]),
        ]
        if bias:
            added.append(numpy_helper.from_array(consts[bias].reshape(-1, 1, 1), f"{y}__bias"))
            nodes.append(helper.make_node("Add", [scaled, f"{y}__bias"], [y]))
    for dropped in ("DequantizeLinear", "Constant"):  # the second: the zero-points they took
        used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
        nodes = [n for n in nodes if n.op_type != dropped or n.output[0] in used]
    kept = [i for i in g.initializer if i.name in used] + added
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(kept)


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
    _integer_kernels(g)
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
