"""Per-block error: where quantization departs from float, and where the deployed graph departs
from the fake-quant model it claims to be.

Torch models are read with forward hooks on ``model.blocks``; the ONNX graph by exposing each
block's residual output (the last ``Add`` directly under ``/blocks/blocks.N/``, as the
TorchScript exporter names it) as an extra graph output. Only a fixed probe of images is used and
only one relative error per block is kept, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from clamp_export.runtime.fp16_rounding import explicit_fp16, is_fp16_graph
from clamp_export.runtime.runners import session_options

PROBE_IMAGES = 64


@torch.no_grad()
def torch_block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output, on the CPU, wherever the model runs (``--device cuda``)."""
    outs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: outs.append(o.float().cpu())) for b in model.blocks
    ]
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return outs


def block_output_names(proto: onnx.ModelProto, depth: int) -> list[str] | None:
    """The graph tensor holding each block's output, or None where the names do not say."""
    names = []
    for i in range(depth):
        prefix = f"/blocks/blocks.{i}/"
        adds = [
            n.output[0]
            for n in proto.graph.node
            if n.op_type == "Add" and n.name.startswith(prefix) and "/" not in n.name[len(prefix) :]
        ]
        if not adds:
            return None
        names.append(adds[-1])
    return names


def onnx_block_outputs(path: Path, x: torch.Tensor, depth: int) -> list[torch.Tensor] | None:
    import onnxruntime as ort

    proto = onnx.load(str(path))
    names = block_output_names(proto, depth)
    if names is None:
        return None
    elem = proto.graph.input[0].type.tensor_type.elem_type
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    if is_fp16_graph(proto):  # as ort-qdq runs it (runtime.fp16_rounding)
        proto = explicit_fp16(proto)
    session = ort.InferenceSession(
        proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )
    dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
    feed = {session.get_inputs()[0].name: x.numpy().astype(dtype)}
    return [torch.from_numpy(np.asarray(o)).float() for o in session.run(names, feed)]


def relative_errors(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> list[float]:
    return [
        float((o - r).norm() / r.norm().clamp_min(1e-12)) for o, r in zip(outs, refs, strict=True)
    ]


def per_block(fp32: nn.Module, fakequant: nn.Module, qdq_graph: Path, x: torch.Tensor) -> dict:
    """{comparison: one relative error per block} on the first ``PROBE_IMAGES`` of ``x``."""
    x = x[:PROBE_IMAGES]
    fq = torch_block_outputs(fakequant, x)
    out = {"fake-quant vs FP32": relative_errors(fq, torch_block_outputs(fp32, x))}
    deployed = onnx_block_outputs(qdq_graph, x, len(fq))
    if deployed is not None:
        out["ORT QDQ vs fake-quant"] = relative_errors(deployed, fq)
    return out
