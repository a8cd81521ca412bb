"""Target rules a QDQ graph must satisfy before any engine build (DESIGN §5).

The fast first check, on the CPU, with node names in every message. TensorRT's own parser and
builder are the real check (``clamp_export.build``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from clamp_export.errors import UserError
from clamp_export.quant.bits import BLOCK_SIZES
from clamp_export.quant.targets import TargetProfile

_INTEGER_OPS = {
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
    "QLinearAdd",
    "QLinearMul",
}
_FLOAT_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}
_INT8_TYPES = {onnx.TensorProto.INT8}
_INT4_TYPES = {onnx.TensorProto.INT4}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def load_onnx(path: Path | str) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} not found")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__})") from None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    return consts


def _elem_type(graph: onnx.GraphProto, name: str) -> int | None:
    for i in graph.initializer:
        if i.name == name:
            return i.data_type
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n.attribute[0].t.data_type
    return None


def _expected_weight_axis(consumer: onnx.NodeProto, weight_name: str) -> int | None:
    """Output-channel axis of a weight as its consumer reads it; None if not a weight input."""
    if consumer.op_type == "Conv" and consumer.input[1] == weight_name:
        return 0
    if consumer.op_type == "MatMul" and consumer.input[1] == weight_name:
        return 1  # [K, N] constant: N is the output channel
    if consumer.op_type == "Gemm" and consumer.input[1] == weight_name:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _centres_its_input(reduce_mean: onnx.NodeProto, consumers: dict) -> bool:
    """A LayerNorm written out subtracts the mean from the tensor it was taken of; a pooling head's
    ReduceMean (global_pool="avg") feeds the next layer instead."""
    source = reduce_mean.input[0]
    return any(
        c.op_type == "Sub" and c.input[0] == source and c.input[1] == reduce_mean.output[0]
        for c in consumers.get(reduce_mean.output[0], [])
    )


def _block_problems(n, weight: np.ndarray, scale: np.ndarray, axis: int, block: int, consumers):
    """(rule, message) of a blocked weight DequantizeLinear that TensorRT would not run as
    INT4 weight-only: other block sizes, blocks not along K, consumers other than MatMul/Gemm.
    TensorRT-RTX's parser takes more on the CPU; TensorRT's documentation is the rule."""
    if block not in BLOCK_SIZES:
        yield "block-size", f"block size {block}; TensorRT runs INT4 blocks of 64 or 128"
    for c in consumers.get(n.output[0], []):
        if c.op_type not in ("MatMul", "Gemm") or c.input[1] != n.output[0]:
            yield (
                "block-consumer",
                f"feeds {c.op_type} {c.name}; INT4 blocks feed MatMul/Gemm weights",
            )
            continue
        trans_b = next((a.i for a in c.attribute if a.name == "transB"), 0)
        k_axis = 1 if c.op_type == "Gemm" and trans_b else 0
        if axis != k_axis:
            yield (
                "block-axis",
                f"blocks along axis {axis}; {c.op_type} {c.name} reduces axis {k_axis} (K)",
            )
    want = list(weight.shape)
    if 0 <= axis < len(want) and block:
        want[axis] = -(-want[axis] // block)
    if list(scale.shape) != want:
        yield "block-scale", f"scales of shape {list(scale.shape)} for blocks of shape {want}"


def lint(model: onnx.ModelProto, profile: TargetProfile) -> list[Violation]:
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    consts = _constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    symmetric_only = profile.act_symmetric and profile.weight_symmetric
    out: list[Violation] = []

    def bad(node: onnx.NodeProto | str, rule: str, msg: str) -> None:
        name = node if isinstance(node, str) else (node.name or f"<{node.op_type}>")
        out.append(Violation(name, rule, msg))

    for n in graph.node:
        if n.op_type in _INTEGER_OPS:
            bad(n, "no-integer-ops", f"{n.op_type} is not accepted; use Q/DQ around float ops")
        if n.op_type == "ReduceMean" and _centres_its_input(n, consumers):
            bad(n, "single-layernorm", "decomposed LayerNorm (ReduceMean); export with opset >= 17")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = consts.get(n.input[1])
        zp_name = n.input[2] if len(n.input) > 2 else ""
        zp = consts.get(zp_name) if zp_name else None
        is_weight_dq = n.op_type == "DequantizeLinear" and n.input[0] in consts
        if symmetric_only and zp is not None and np.any(zp != 0):
            bad(
                n,
                "zero-point-0",
                f"zero-point {int(np.ravel(zp)[np.nonzero(np.ravel(zp))[0][0]])} "
                f"but {profile.name} takes only symmetric quantization",
            )
        qtype = _elem_type(graph, zp_name) if zp_name else None
        if is_weight_dq:
            qtype = _elem_type(graph, n.input[0])
        allowed = _INT8_TYPES | (_INT4_TYPES if is_weight_dq and opset >= 21 else set())
        if profile.act_signed and qtype is not None and qtype not in allowed:
            tname = onnx.TensorProto.DataType.Name(qtype)
            bad(n, "int8-only", f"quantized type {tname}; {profile.name} takes int8")
        if scale is None:
            bad(n, "constant-scale", "scale is not a constant")
            continue
        if not is_weight_dq:
            if scale.size != 1:
                bad(n, "per-tensor-activations", f"activation scale has {scale.size} values")
            continue
        weight = consts[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
        if block:
            for rule, msg in _block_problems(n, weight, scale, axis, block, consumers):
                bad(n, rule, msg)
            continue
        for c in consumers.get(n.output[0], []):
            want = _expected_weight_axis(c, n.output[0])
            if want is None:
                continue
            if scale.size > 1 and axis != want:
                bad(
                    n,
                    "weight-axis",
                    f"per-channel axis {axis}, but {c.op_type} {c.name} needs axis {want}",
                )
            elif scale.size not in (1, weight.shape[want]):
                bad(
                    n,
                    "weight-axis",
                    f"{scale.size} scales for {weight.shape[want]} output channels",
                )
    blocked = any(
        n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
        for n in graph.node
    )
    for n in graph.node if blocked else ():
        if n.op_type == "QuantizeLinear":
            bad(
                n,
                "weight-only",
                "activation Q/DQ in an INT4 weight-only graph: TensorRT runs blocked int4 "
                "weights with FP16 activations (w4a16)",
            )
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        bad(
            graph.name or "<graph>",
            "quantized",
            "no QuantizeLinear/DequantizeLinear at all: a float graph, not a quantized deployment; "
            "export it with clamp-export",
        )
    want_float = _FLOAT_TYPES[profile.float_dtype]
    for v in list(graph.input) + list(graph.output):
        et = v.type.tensor_type.elem_type
        if et in _FLOAT_TYPES.values() and et != want_float:
            bad(
                v.name,
                "float-type",
                f"{onnx.TensorProto.DataType.Name(et)} graph I/O; "
                f"{profile.name} needs {profile.float_dtype}",
            )
    return out


def lint_file(path: Path | str, profile: TargetProfile) -> list[Violation]:
    return lint(load_onnx(path), profile)
