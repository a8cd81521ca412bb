"""The report's backends, by name: each runs images to logits and can be timed on one batch.

A backend that cannot run here (no GPU, no onnxruntime-gpu, no TensorRT, no engine) says why in
one line, and the report lists it as skipped; asking for it by name is then an error that says
how to install what it needs (Polygraphy's runners are the model: one interface, lazy imports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clamp_export.errors import UserError
from clamp_export.runtime.engine import EngineRunner, engine_missing
from clamp_export.runtime.runners import OrtRunner, TorchRunner

GPU_HINT = "pip install 'clamp-export[gpu]' (onnxruntime-gpu, which replaces onnxruntime) on a CUDA machine"


@dataclass
class Artifacts:
    """What the backends run: the two torch models and the run directory's graphs."""

    fp32: nn.Module
    fakequant: nn.Module
    float_graph: Path
    qdq_graph: Path
    device: str = "cpu"
    threads: int | None = None
    engines: dict = field(default_factory=dict)  # backend name -> (engine path, build record)
    engine_cache: Path | None = None  # where ort-trt keeps the engines its TensorRT EP builds


class Backend:
    """A runner with a name, a float baseline and a way to time one batch."""

    def __init__(
        self, name: str, run: Callable, baseline: str | None, batch_size: int = 256
    ) -> None:
        self.name, self.baseline, self._run, self.batch_size = name, baseline, run, batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.run_batch(x) for x in images.split(self.batch_size)]).float()

    def run_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _torch(model: nn.Module, name: str, device: str, baseline: str | None) -> Backend:
    runner = TorchRunner(model.to(device), name)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = runner(x.to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out.cpu()

    return Backend(name, run, baseline)


def _ort(path: Path, name: str, providers: list[str], threads, baseline: str | None) -> Backend:
    runner = OrtRunner(path, name, providers=providers, threads=threads)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(runner.run_batch(x.numpy().astype(runner.dtype))))

    return Backend(name, run, baseline)


def _engine(a: Artifacts, name: str, baseline: str | None) -> Backend:
    path, record = a.engines[name]
    runner = EngineRunner(path, record)
    return Backend(name, lambda x: torch.from_numpy(runner.run_batch(x.numpy())), baseline)


def _ort_provider_missing(provider: str, device: str) -> str | None:
    import onnxruntime

    if provider not in onnxruntime.get_available_providers():
        return f"onnxruntime has no {provider}; {GPU_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def _ort_trt_providers(a: Artifacts) -> list:
    """TensorRT EP with FP16 kernels allowed (the QDQ graph's float parts are FP16 on trt) and
    its engines cached beside the run, so a second report does not rebuild them."""
    options = {"trt_fp16_enable": "True"}
    if a.engine_cache is not None:
        a.engine_cache.mkdir(parents=True, exist_ok=True)
        options |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(a.engine_cache)}
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"]


@dataclass(frozen=True)
class BackendSpec:
    missing: Callable[[str], str | None]  # why it cannot run here on a device, or None
    make: Callable[[Artifacts], Backend]
    needs: Callable[[Artifacts], str | None] = lambda a: None  # what the run lacks for it


def _cuda_missing(device: str) -> str | None:
    return None if not device.startswith("cuda") or torch.cuda.is_available() else "no CUDA GPU"


def _runs_anywhere(device: str) -> None:
    return None


BACKENDS: dict[str, BackendSpec] = {
    "torch-fp32": BackendSpec(
        _cuda_missing, lambda a: _torch(a.fp32, "torch-fp32", a.device, None)
    ),
    "torch-fakequant": BackendSpec(
        _cuda_missing, lambda a: _torch(a.fakequant, "torch-fakequant", a.device, "torch-fp32")
    ),
    "ort-fp32": BackendSpec(
        _runs_anywhere,
        lambda a: _ort(a.float_graph, "ort-fp32", ["CPUExecutionProvider"], a.threads, None),
    ),
    "ort-qdq": BackendSpec(
        _runs_anywhere,
        lambda a: _ort(a.qdq_graph, "ort-qdq", ["CPUExecutionProvider"], a.threads, "ort-fp32"),
    ),
    "ort-cuda": BackendSpec(
        lambda d: _ort_provider_missing("CUDAExecutionProvider", d),
        lambda a: _ort(a.qdq_graph, "ort-cuda", ["CUDAExecutionProvider"], a.threads, None),
    ),
    "ort-trt": BackendSpec(
        lambda d: _ort_provider_missing("TensorrtExecutionProvider", d),
        lambda a: _ort(a.qdq_graph, "ort-trt", _ort_trt_providers(a), a.threads, None),
    ),
    "trt": BackendSpec(
        engine_missing,
        lambda a: _engine(a, "trt", "trt-fp16"),
        lambda a: None if "trt" in a.engines else "the run has no model.engine (--target trt)",
    ),
    "trt-fp16": BackendSpec(
        engine_missing,
        lambda a: _engine(a, "trt-fp16", None),
        lambda a: None if "trt-fp16" in a.engines else "the run has no model.fp16.engine",
    ),
}
DEFAULT_BACKENDS = tuple(BACKENDS)


def parse_backends(text: str | None) -> tuple[tuple[str, ...], bool]:
    """(names, asked): ``asked`` makes a backend that cannot run an error instead of a skip."""
    if not text:
        return DEFAULT_BACKENDS, False
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UserError(
            f"unknown --backends {','.join(unknown) or text!r}; choose from: {', '.join(BACKENDS)}"
        )
    return names, True


def unavailable(names, asked: bool, device: str) -> dict[str, str]:
    """{name: why it cannot run}; a backend asked for by name must run, so that is an error
    (called before any work starts)."""
    skipped = {}
    for name in names:
        why = BACKENDS[name].missing(device)
        if why is not None and asked:
            raise UserError(f"backend {name} cannot run here: {why}")
        if why is not None:
            skipped[name] = why
    return skipped


def open_backends(
    names, asked: bool, artifacts: Artifacts
) -> tuple[dict[str, Backend], dict[str, str]]:
    """(backends that run, {name: why skipped})."""
    skipped = unavailable(names, asked, artifacts.device)
    for name in dict.fromkeys(names):
        why = None if name in skipped else BACKENDS[name].needs(artifacts)
        if why is not None and asked:
            raise UserError(f"backend {name} cannot run on this run directory: {why}")
        if why is not None:
            skipped[name] = why
    ready = {n: BACKENDS[n].make(artifacts) for n in dict.fromkeys(names) if n not in skipped}
    return ready, skipped
