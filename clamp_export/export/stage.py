"""The export stage: searched parameters in, a linted QDQ graph out (``model.qdq.onnx``)."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_float, export_qdq
from clamp_export.models import LoadedModel
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.fakequant import load_qparams, quantizers, wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import WEIGHT_ONLY_OPSET, TargetProfile, get_profile

GRAPH, FLOAT_GRAPH = "model.qdq.onnx", "model.fp32.onnx"
FP16_GRAPH = "model.fp16.onnx"  # trt: the float model in FP16, for the baseline engine


def fakequant_model(loaded: LoadedModel, qp: QParams) -> tuple[nn.Module, TargetProfile]:
    """The fake-quant model ``qp`` describes, on the float model of ``loaded``, and its target.

    A file made for another model is refused with the module names that do not match.
    """
    profile = get_profile(qp.target)
    qp.validate(profile)
    qmodel = wrap_model(loaded.model, BitsSpec.parse(qp.bits), profile)
    load_qparams(qmodel, qp)  # bits, twin levels and windows come from the file
    return qmodel, profile


def export_stage(
    qmodel: nn.Module, loaded: LoadedModel, profile: TargetProfile, path: Path, log=print
) -> onnx.ModelProto:
    """Export and lint: a graph that breaks the target's rules is never left behind.

    The float model's FP32 graph goes beside it (``model.fp32.onnx``): the latency baseline on
    ORT; for ``trt`` also its FP16 graph (``model.fp16.onnx``), the baseline engine's.
    """
    floats = [FLOAT_GRAPH] + ([FP16_GRAPH] if profile.float_dtype == "float16" else [])
    blocked = any(q.block for _, _, q in quantizers(qmodel))  # INT4 weight-only: opset 21
    opset = WEIGHT_ONLY_OPSET if blocked else profile.opset
    log(f"exporting {path.name} (opset {opset}, {profile.float_dtype}), {', '.join(floats)}")
    size = loaded.preprocess.input_size
    export_float(loaded.model, size, path.parent / FLOAT_GRAPH)
    if FP16_GRAPH in floats:
        export_float(loaded.model, size, path.parent / FP16_GRAPH, torch.float16)
    proto = export_qdq(qmodel, loaded.preprocess.input_size, profile, path)
    violations = lint(proto, profile)
    if violations:
        path.unlink(missing_ok=True)
        raise UserError(
            f"exported graph breaks {profile.name} rules: {violations[0]} (+{len(violations) - 1} more)"
        )
    return proto
