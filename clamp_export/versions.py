"""The versions every artifact records: the stack, the TensorRT flavour, and the git commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from clamp_export import __version__
from clamp_export.build import trt as trt_build


def versions() -> dict:
    import onnx
    import onnxruntime
    import timm

    v = {
        "clamp_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    trt_name = trt_build.available()
    if trt_name:
        v[trt_name] = getattr(trt_build.load_tensorrt(trt_name), "__version__", "?")
    commit = git_commit()
    if commit:
        v["git_commit"] = commit
    return v


def git_commit() -> str | None:
    """The checkout's commit when clamp-export runs from one (None when installed from a wheel)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
