"""QDQ ONNX export (DESIGN §4) of a fake-quant model, with the exact parameters it holds.

Traced with the TorchScript exporter: the quantizers' ``symbolic`` methods write
QuantizeLinear/DequantizeLinear themselves (torch's own fake-quant export refuses 4-bit and
narrow ranges), weights go in as int8 initializers, LayerNorm stays one node (opset >= 17).
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from clamp_export import atomic
from clamp_export.quant.fakequant import exporting, quantizers
from clamp_export.quant.targets import WEIGHT_ONLY_OPSET, TargetProfile

INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _trace(
    model: nn.Module, dummy: torch.Tensor, opset: int, path: Path | str, finish=None
) -> onnx.ModelProto:
    """TorchScript-export ``model`` with a dynamic batch, ``finish(proto)`` it where asked,
    check it, and write it atomically."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "clamp-export"
    if finish is not None:
        finish(proto)
    onnx.checker.check_model(proto, full_check=True)
    with atomic.atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return proto


def export_qdq(
    qmodel: nn.Module, input_size: tuple[int, int, int], profile: TargetProfile, path: Path | str
) -> onnx.ModelProto:
    """Write ``qmodel`` as a QDQ graph in the profile's float type; return the checked model."""
    dtype = torch.float16 if profile.float_dtype == "float16" else torch.float32
    model = copy.deepcopy(qmodel).to(dtype) if dtype != torch.float32 else qmodel
    blocked = any(q.block for _, _, q in quantizers(qmodel))
    with exporting(model, dtype):
        dummy = torch.zeros(2, *input_size, dtype=dtype)
        return _trace(model, dummy, profile.opset, path, _int4_blocks if blocked else None)


def _int4_blocks(proto: onnx.ModelProto) -> None:
    """Blocked weights as INT4 initializers, and the graph at opset 21, where DequantizeLinear
    takes int4 and ``block_size``. The TorchScript exporter stops at opset 20, so it traces the
    int4 levels in int8 containers; between 19 and 21 the graph's other ops only gained types."""
    initializers = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and any(
            a.name == "block_size" for a in node.attribute
        ):
            init = initializers[node.input[0]]
            levels = numpy_helper.to_array(init)
            init.CopyFrom(
                helper.make_tensor(
                    init.name, TensorProto.INT4, levels.shape, levels.flatten().tolist()
                )
            )
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = WEIGHT_ONLY_OPSET


def export_float(
    model: nn.Module,
    input_size: tuple[int, int, int],
    path: Path | str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """The float model as an FP32 graph (the latency baseline on ORT), or FP16 (the baseline
    engine on TensorRT); LayerNorm stays one node (opset 17), as TensorRT fuses it best."""
    model = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
    _trace(model, torch.zeros(2, *input_size, dtype=dtype), 17, path)
