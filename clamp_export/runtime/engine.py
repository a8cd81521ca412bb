"""A run's TensorRT engines as report backends: Polygraphy's ``TrtRunner``, imported lazily.

An engine runs only on the TensorRT flavour and version that built it, and on a GPU it was built
for, so its build record (``model.engine.json``) is checked against this machine first and a
mismatch names both sides. Building needs no GPU (TensorRT-RTX builds ahead of time on a CPU);
deserializing and running an engine does, and without one the backends are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clamp_export.build import trt as trt_build
from clamp_export.errors import UserError

NO_GPU = "running a TensorRT engine needs a CUDA GPU (here TensorRT only builds it, ahead of time)"


def engine_missing(device: str) -> str | None:
    """Why no engine can run on this machine, or None."""
    if trt_build.available() is None:
        return f"TensorRT is not installed; {trt_build.INSTALL_HINT}"
    if trt_build.gpu() is None:
        return NO_GPU
    return None


def check_engine_fits(record: dict, name: str) -> None:
    """Refuse an engine built by another TensorRT or for another GPU, naming both."""
    flavour = trt_build.available()
    version = getattr(trt_build.load_tensorrt(flavour), "__version__", "?")
    rebuild = f"rebuild it here: clamp-export build RUN/model.qdq.onnx --out RUN ({name})"
    if (record.get("module"), record.get("version")) != (flavour, version):
        raise UserError(
            f"{name} was built by {record.get('module')} {record.get('version')}, but this "
            f"machine has {flavour} {version}; {rebuild}"
        )
    here = trt_build.gpu() or {}
    target = record.get("target") or {}
    caps = target.get("compute_capabilities")
    built = target.get("built_on_gpu") or {}
    cc = here.get("compute_capability")
    if isinstance(caps, list) and caps and cc not in caps:
        raise UserError(
            f"{name} was built for compute capabilities {', '.join(caps)}, but this GPU "
            f"({here.get('name')}) is {cc}; {rebuild}"
        )
    if flavour == "tensorrt" and built and built.get("compute_capability") != cc:
        raise UserError(
            f"{name} was built on {built.get('name')} (compute capability "
            f"{built.get('compute_capability')}), but this GPU is {here.get('name')} ({cc}); "
            f"{rebuild}"
        )


class EngineRunner:
    """``run_batch(x)`` on a TensorRT engine; inputs cast to the engine's input type."""

    def __init__(self, path: Path, record: dict, input_name: str = "input") -> None:
        check_engine_fits(record, path.name)
        ptrt, _ = trt_build.polygraphy_trt()
        self.input_name = input_name
        with trt_build.quiet(f"TensorRT cannot run {path} (corrupt, or not an engine)"):
            self.runner = ptrt.TrtRunner(ptrt.EngineFromBytes(path.read_bytes()))
            self.runner.activate()
            meta = self.runner.get_input_metadata()
        from polygraphy.datatype import DataType

        dtype = meta[input_name].dtype if input_name in meta else None
        self.dtype = DataType.to_dtype(dtype, "numpy") if dtype is not None else np.float32

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        outputs = self.runner.infer({self.input_name: x.astype(self.dtype)})
        return next(iter(outputs.values()))
