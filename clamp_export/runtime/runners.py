"""One runner interface over every backend: ``runner(images) -> logits`` (float32, torch).

Images are normalized float32 [N, C, H, W]; each runner feeds them in batches in its own dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clamp_export.errors import UserError


class TorchRunner:
    def __init__(self, model: nn.Module, name: str, batch_size: int = 256) -> None:
        self.model, self.name, self.batch_size = model.eval(), name, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = [
            self.model(images[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(outs).float()


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _graph_for(path: Path | str, providers: list) -> str | bytes:
    """The file, or, for an FP16 graph on the CPU EP alone, its copy with explicit FP16 rounding
    (``fp16_rounding``): what the CPU EP would otherwise compute is neither the graph nor TensorRT."""
    if providers != ["CPUExecutionProvider"]:
        return os.fspath(path)
    import onnx

    from clamp_export.runtime.fp16_rounding import explicit_fp16, is_fp16_graph

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return os.fspath(path)  # ONNX Runtime says what is wrong with it
    return explicit_fp16(proto).SerializeToString() if is_fp16_graph(proto) else os.fspath(path)


def session_options(threads: int | None = None):
    """ONNX Runtime session options for every session that runs our graphs.

    ``session.x64quantprecision``: on x86 CPUs without VNNI (AVX2, or AVX-512 before VNNI) ONNX
    Runtime's fast U8S8 integer kernels sum pairs of 8-bit products in 16 bits and saturate, so
    a graph with 8-bit weights computes something else than the model (0.24 logit error at W8A8
    on the unit-test model). The option swaps in the exact U8U8 kernels there; on VNNI or AMX CPUs
    it changes nothing. ``threads`` caps intra-op threads (benchmarks pin it).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OrtRunner:
    """An ONNX Runtime session (``session_options``)."""

    def __init__(
        self,
        path: Path | str,
        name: str = "ort",
        providers: list[str] | None = None,
        threads: int | None = None,
        batch_size: int = 256,
    ) -> None:
        import onnxruntime as ort

        opts = session_options(threads)
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(
                _graph_for(path, providers), opts, providers=providers
            )
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot load {path}: {e}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = _ORT_TYPES.get(inp.type, np.float32)
        self.name, self.batch_size = name, batch_size

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.numpy().astype(self.dtype)
        outs = [
            self.run_batch(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)
        ]
        return torch.from_numpy(np.concatenate(outs)).float()
