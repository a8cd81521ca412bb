"""Where Stage 1 and Stage 2 compute (``--device``); export and parity always use the CPU."""

from __future__ import annotations

import torch

from clamp_export.errors import UserError


def compute_device(name: str) -> torch.device:
    """The torch device of ``--device``, refused up front when this machine cannot provide it."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r}; choose cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(
                f"--device {name}: torch {torch.__version__} sees no CUDA GPU; install a CUDA "
                "build of torch on a GPU machine, or use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {name}: only {count} CUDA GPU(s) visible (cuda:0..)")
    return dev
