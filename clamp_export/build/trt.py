"""TensorRT engine building. The only module that imports TensorRT, and only when called.

Takes either ``tensorrt`` (datacenter TensorRT, on a GPU machine) or ``tensorrt_rtx``
(TensorRT-RTX, whose parser and ahead-of-time builder run on a CPU) behind one interface, so CI
proves on every change that TensorRT's real parser and builder accept our graphs.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from clamp_export import atomic
from clamp_export.errors import UserError

MODULES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = (
    "install TensorRT: pip install 'clamp-export[trt]' on a GPU machine, or "
    "pip install tensorrt-rtx-cu12 (its builder runs on the CPU)"
)


def load_tensorrt(prefer: str | None = None) -> ModuleType:
    """Import the first TensorRT flavour available (or ``prefer``), with a how-to-fix error."""
    names = (prefer,) if prefer else MODULES
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UserError(
        f"TensorRT is not installed ({' or '.join(names)} not importable); {INSTALL_HINT}"
    )


def available() -> str | None:
    for name in MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


@dataclass
class BuildResult:
    module: str
    version: str
    plan_bytes: int
    network_layers: int
    strongly_typed: bool


def _network_flags(trt: ModuleType) -> tuple[int, bool]:
    """STRONGLY_TYPED where it exists (TensorRT >= 10.12, TensorRT 11, TensorRT-RTX)."""
    flag_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(flag_enum, "EXPLICIT_BATCH"):  # harmless on 10.x, gone later
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    if hasattr(flag_enum, "STRONGLY_TYPED"):
        return flags | 1 << int(flag_enum.STRONGLY_TYPED), True
    return flags, False


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str | None,
    *,
    input_shape: tuple[int, int, int],
    batch: tuple[int, int, int] = (1, 8, 32),
    module: str | None = None,
    input_name: str = "input",
) -> BuildResult:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build a plan for a batch range.

    ``batch`` is (min, opt, max) of the optimization profile. Weakly typed TensorRT (< 10.12)
    gets the INT8 and FP16 builder flags instead of STRONGLY_TYPED.
    """
    trt = load_tensorrt(module)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(
            f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else '?'}"
        )
    config = builder.create_builder_config()
    if not strongly_typed:
        for name in ("INT8", "FP16"):
            if hasattr(trt.BuilderFlag, name):
                config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    lo, opt, hi = ((b, *input_shape) for b in batch)
    profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    data = bytes(plan)
    if engine_path is not None:
        with atomic.atomic_path(engine_path) as tmp:
            tmp.write_bytes(data)
    return BuildResult(
        module=trt.__name__,
        version=getattr(trt, "__version__", "?"),
        plan_bytes=len(data),
        network_layers=network.num_layers,
        strongly_typed=strongly_typed,
    )
