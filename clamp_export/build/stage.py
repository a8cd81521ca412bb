"""The build stage: a linted ``trt`` graph in, a TensorRT engine and its record out; for a run,
also the FP16 baseline engine of the float model, so INT8 is compared with FP16 on one GPU."""

from __future__ import annotations

import json
from pathlib import Path

from clamp_export import atomic
from clamp_export.build import trt as trt_build
from clamp_export.build.trt import BuildOptions
from clamp_export.errors import UserError
from clamp_export.export.lint import lint, load_onnx
from clamp_export.quant.targets import get_profile

ENGINE, ENGINE_RECORD = "model.engine", "model.engine.json"
FP16_ENGINE, FP16_ENGINE_RECORD = "model.fp16.engine", "model.fp16.engine.json"
NO_GPU_INSPECTOR = "per-layer precisions need a GPU (the engine inspector deserializes the engine)"
# data types as the inspector spells them inside a format ("Row major linear FP16 format", ...)
_DTYPES = ("Int4", "Int8", "FP4", "FP8", "BF16", "FP16", "FP32", "Half", "Float", "Int32", "Bool")


def record_name(engine: str) -> str:
    return engine.removesuffix(".engine") + ".engine.json"


def graph_input_shape(proto) -> tuple[int, int, int]:
    """(C, H, W) of the graph's image input; the batch axis is dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if len(shape) != 3 or not all(shape):
        raise UserError(f"the graph's input {proto.graph.input[0].name} is not [batch, C, H, W]")
    return shape


def precision_counts(engine_information: dict) -> dict:
    """Layers per precision from the engine inspector's JSON (built with detailed profiling):
    a layer's precision is the data type of its first input, as trtexec's layer info shows it."""
    counts: dict[str, int] = {}
    for layer in engine_information.get("Layers", []):
        if not isinstance(layer, dict) or not layer.get("Inputs"):
            continue
        fmt = str(layer["Inputs"][0].get("Format/Datatype", ""))
        dtype = next((d for d in _DTYPES if d in fmt.split()), "other")
        counts[dtype] = counts.get(dtype, 0) + 1
    return dict(sorted(counts.items()))


def layer_precisions(engine_path: Path) -> dict:
    """{"counts": {precision: layers}} from the engine inspector, or why there are none."""
    if trt_build.gpu() is None:
        return {"skipped": NO_GPU_INSPECTOR}
    ptrt, flavour = trt_build.polygraphy_trt()
    trt = trt_build.load_tensorrt(flavour)
    with trt_build.quiet(f"TensorRT cannot deserialize {engine_path}"):
        engine = ptrt.engine_from_bytes(engine_path.read_bytes())
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"counts": precision_counts(info)}


def build_stage(
    onnx_path: Path,
    target: str,
    out: Path,
    log=print,
    options: BuildOptions | None = None,
    engine: str = ENGINE,
    baseline: bool = False,
) -> dict:
    """Lint ``onnx_path`` for ``target`` (a quantized graph), then build ``out/ENGINE`` where
    TensorRT is; ``baseline`` builds a float graph, which has no Q/DQ to lint.

    Returns the build record (also ``out/ENGINE.json``), or a skip record without TensorRT.
    """
    profile = get_profile(target)
    if profile.name != "trt":
        raise UserError(f"engines are built for --target trt, not {target}")
    options = options or BuildOptions()
    options.check()
    proto = load_onnx(onnx_path)
    violations = [] if baseline else lint(proto, profile)
    if violations:
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise UserError(
            f"{onnx_path} breaks the trt rules, so no engine is built: {violations[0]}{more}"
        )
    if not trt_build.available():
        return {"skipped": f"TensorRT not installed; {trt_build.INSTALL_HINT}"}
    log(f"building {engine} ahead of time ({trt_build.available()})")
    record = trt_build.build_engine(
        onnx_path, out / engine, input_shape=graph_input_shape(proto), options=options
    )
    record["layers"] = layer_precisions(out / engine)
    atomic.write_json(out / record_name(engine), record)
    return record
