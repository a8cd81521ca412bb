"""The build stage: a linted ``trt`` graph in, a TensorRT engine and its record out."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from clamp_export import atomic
from clamp_export.build import trt as trt_build
from clamp_export.errors import UserError
from clamp_export.export.lint import lint, load_onnx
from clamp_export.quant.targets import get_profile

ENGINE, ENGINE_RECORD = "model.engine", "model.engine.json"


def graph_input_shape(proto) -> tuple[int, int, int]:
    """(C, H, W) of the graph's image input; the batch axis is dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if len(shape) != 3 or not all(shape):
        raise UserError(f"the graph's input {proto.graph.input[0].name} is not [batch, C, H, W]")
    return shape


def build_stage(onnx_path: Path, target: str, out: Path, log=print) -> dict:
    """Lint ``onnx_path`` for ``target``, then build ``out/model.engine`` where TensorRT is.

    Returns the build record (also ``out/model.engine.json``), or a skip record without TensorRT.
    """
    profile = get_profile(target)
    if profile.name != "trt":
        raise UserError(f"engines are built for --target trt, not {target}")
    proto = load_onnx(onnx_path)
    violations = lint(proto, profile)
    if violations:
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise UserError(
            f"{onnx_path} breaks the trt rules, so no engine is built: {violations[0]}{more}"
        )
    if not trt_build.available():
        return {"skipped": f"TensorRT not installed; {trt_build.INSTALL_HINT}"}
    log("building a TensorRT engine ahead of time")
    result = trt_build.build_engine(onnx_path, out / ENGINE, input_shape=graph_input_shape(proto))
    record = asdict(result)
    atomic.write_json(out / ENGINE_RECORD, record)
    return record
