"""TensorRT engines through Polygraphy: the only module that imports TensorRT, and only when called.

Either flavour sits behind one interface: ``tensorrt`` (datacenter TensorRT, on a GPU machine)
or ``tensorrt_rtx`` (TensorRT-RTX, whose parser and ahead-of-time builder run on a CPU), so CI
proves on every change that TensorRT's real parser and builder accept our graphs. Polygraphy
drives TensorRT-RTX when ``POLYGRAPHY_USE_TENSORRT_RTX=1`` is set before its TensorRT backend is
imported; ``polygraphy_trt`` sets it for the flavour found, once per process.

Polygraphy logs to stdout; its lines are captured, and a failure becomes one line carrying
TensorRT's first error.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import time
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
RTX_NO_TIMING_CACHE = "TensorRT-RTX has no timing cache (its timing-cache calls are no-ops)"


def available() -> str | None:
    """The TensorRT flavour this process uses: datacenter TensorRT first, then TensorRT-RTX."""
    for name in MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


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


def polygraphy_trt() -> tuple[ModuleType, str]:
    """(polygraphy.backend.trt, flavour), Polygraphy switched to TensorRT-RTX where that is
    the flavour; refused where neither is installed."""
    flavour = available()
    if flavour is None:
        raise UserError(f"TensorRT is not installed; {INSTALL_HINT}")
    if flavour == "tensorrt_rtx":
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
        from polygraphy import config

        config.USE_TENSORRT_RTX = True  # read when the TensorRT backend is first imported
    from polygraphy.backend import trt as ptrt
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    return ptrt, flavour


@contextlib.contextmanager
def quiet(what: str):
    """Polygraphy's and TensorRT's log lines captured; a failure re-raised as one line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except UserError:
        raise
    except Exception as e:
        errors = [ln[4:] for ln in buf.getvalue().splitlines() if ln.startswith("[E] ")]
        raise UserError(f"{what}: {errors[0] if errors else e}") from None


@dataclass(frozen=True)
class BuildOptions:
    """How an engine is built. The profile's (min, opt, max) batch comes from the report's
    batch sweep, so every batch the report times is inside it."""

    batches: tuple[int, ...] = (1, 8, 32)
    optimization_level: int | None = None  # builder optimization level 0..5 (TensorRT: 3)
    workspace_mb: int | None = None  # workspace memory pool limit
    compute_capabilities: tuple[tuple[int, int], ...] = ()  # TensorRT-RTX ahead-of-time targets
    cache_root: Path | None = None  # the store: ROOT/timing/ holds datacenter TensorRT's caches

    def profile(self) -> tuple[int, int, int]:
        b = sorted(self.batches)
        return b[0], b[len(b) // 2], b[-1]

    def check(self) -> None:
        """Refused before any work: values TensorRT would reject after a long export."""
        if not self.batches or min(self.batches) < 1:
            raise UserError("an engine's batch range needs batch sizes of at least 1")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise UserError(
                f"--builder-optimization-level {self.optimization_level} must lie in 0..5"
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise UserError(f"--workspace-mb {self.workspace_mb} must be at least 1")
        if self.compute_capabilities and available() == "tensorrt":
            raise UserError(
                "--compute-capability is for TensorRT-RTX ahead-of-time builds; datacenter "
                "TensorRT builds for the GPU it runs on"
            )
        if self.compute_capabilities and available() == "tensorrt_rtx":
            trt = load_tensorrt("tensorrt_rtx")
            for major, minor in self.compute_capabilities:
                if not hasattr(trt.ComputeCapability, f"SM{major}{minor}"):
                    known = [
                        f"{n[2:-1]}.{n[-1]}"
                        for n in trt.ComputeCapability.__members__
                        if n.startswith("SM")
                    ]
                    raise UserError(
                        f"--compute-capability {major}.{minor} is not one TensorRT-RTX "
                        f"{trt.__version__} builds for; choose from {', '.join(known)}"
                    )


def parse_compute_capabilities(text: str | None) -> tuple[tuple[int, int], ...]:
    """``8.9,12.0`` -> ((8, 9), (12, 0))."""
    if not text:
        return ()
    out = []
    for item in text.split(","):
        major, dot, minor = item.strip().partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise UserError(f"malformed --compute-capability {item!r}: expected e.g. 8.9 or 12.0")
        out.append((int(major), int(minor)))
    return tuple(out)


def gpu() -> dict | None:
    """The CUDA GPU here, if any (name and compute capability), for the record and the cache."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:
        return None


def timing_cache_path(root: Path, flavour: str, version: str, gpu: dict | None) -> Path:
    """One cache per TensorRT flavour, version and GPU: a cache from another is not valid."""
    where = "cpu" if gpu is None else f"{gpu['name']}-sm{gpu['compute_capability']}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{flavour}-{version}-{where}")
    return Path(root) / "timing" / f"{safe}.cache"


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str | None,
    *,
    input_shape: tuple[int, int, int],
    options: BuildOptions = BuildOptions(),
    input_name: str = "input",
) -> dict:
    """Parse ``onnx_path`` strongly typed with TensorRT's ONNX parser and build a plan.

    Returns the build record (``model.engine.json``): flavour, version, target GPU or compute
    capabilities, profile shapes, builder settings, timing cache, ONNX sha256, build time.
    """
    ptrt, flavour = polygraphy_trt()
    trt = load_tensorrt(flavour)
    version = getattr(trt, "__version__", "?")
    lo, opt, hi = ((b, *input_shape) for b in options.profile())
    profile = ptrt.Profile().add(input_name, lo, opt, hi)
    here = gpu()
    common = dict(
        profiles=[profile],
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # for the engine inspector
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=(
            {trt.MemoryPoolType.WORKSPACE: options.workspace_mb << 20}
            if options.workspace_mb
            else None
        ),
    )
    cache = None
    if flavour == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        caps = [list(c) for c in options.compute_capabilities] or None
        config = CreateConfigRTX(compute_capabilities=caps, **common)
        cache_record: dict = {"skipped": RTX_NO_TIMING_CACHE}
    else:
        if options.cache_root is not None:
            cache = timing_cache_path(options.cache_root, flavour, version, here)
            cache.parent.mkdir(parents=True, exist_ok=True)
        load = str(cache) if cache is not None and cache.is_file() else None
        config = ptrt.CreateConfig(load_timing_cache=load, **common)
        cache_record = {"path": None if cache is None else str(cache), "loaded": load is not None}
    t0 = time.time()
    with quiet(f"TensorRT's ONNX parser rejected {onnx_path}"):
        network = ptrt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        builder, net, parser = network()
        layers = net.num_layers
    with quiet(f"TensorRT failed to build an engine from {onnx_path}"):
        plan = ptrt.EngineBytesFromNetwork(
            (builder, net, parser),
            config=config,
            save_timing_cache=None if cache is None else str(cache),
        )()
        if plan is None:
            raise UserError(f"TensorRT failed to build an engine from {onnx_path}")
        data = bytes(plan)
    seconds = time.time() - t0
    if engine_path is not None:
        with atomic.atomic_path(engine_path) as tmp:
            tmp.write_bytes(data)
    return {
        "module": flavour,
        "version": version,
        "plan_bytes": len(data),
        "build_seconds": round(seconds, 2),
        "onnx": Path(onnx_path).name,
        "onnx_sha256": atomic.sha256_file(onnx_path),
        "strongly_typed": True,
        "network_layers": layers,
        "profile": {"input": input_name, "min": list(lo), "opt": list(opt), "max": list(hi)},
        "builder": {
            "optimization_level": options.optimization_level,
            "workspace_mb": options.workspace_mb,
        },
        "target": {
            "built_on_gpu": here,
            "compute_capabilities": (
                [f"{a}.{b}" for a, b in options.compute_capabilities] or "TensorRT-RTX default"
                if flavour == "tensorrt_rtx"
                else None  # datacenter TensorRT: the GPU it was built on
            ),
        },
        "timing_cache": cache_record,
    }
