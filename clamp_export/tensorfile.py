"""Reading tensor files (.safetensors, or torch's .pt/.pth) without ever running code from them.

torch files load with ``weights_only=True``; one that pickles anything beyond tensors is refused
with a line of our own. torch's own message advises ``weights_only=False``, the unsafe fix.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from clamp_export.errors import UserError


def read_tensor_file(path: Path | str, what: str) -> object:
    """The object in ``path`` (a dict of tensors, or a tensor); every failure is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"refusing to load {what} {path}: it pickles Python objects besides tensors, and "
            "unpickling them could run code; re-save it as a plain state dict or as .safetensors"
        ) from None
    except Exception as e:  # corrupt files raise a zoo of types from both loaders
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read {what} {path}: it is corrupt or not a tensor file ({detail})"
        ) from None
