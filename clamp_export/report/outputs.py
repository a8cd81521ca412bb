"""Each backend's logits on the eval images, kept in the store under what decides them.

A backend's outputs are a function of the graph it runs (or, for the torch backends, the graph
their model was exported as: the export is a trace of that model), of the images, of the
runtime's version and threads, and of the code that computes fake-quant. The key hashes all of
them, so a pipeline rerun with unchanged artifacts reads the logits of 10k images in a second
instead of recomputing them; anything that changes one byte of a graph misses. Latency is
always measured afresh, and the report names every backend whose outputs were reused.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clamp_export import atomic
from clamp_export.store import Store, recipe_key
from clamp_export.versions import versions

# which of the run's graphs ("qdq" or "float") decides a backend's outputs
GRAPH_OF = {"torch-fp32": "float", "ort-fp32": "float"}  # every other backend: "qdq"
_FILE = "logits.safetensors"
_CODE = ("quant", "export", "runtime")  # the packages whose code computes the outputs


@functools.cache  # the package's code does not change while it runs
def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in _CODE:
        for f in sorted((root / folder).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _images_digest(x: torch.Tensor) -> str:
    h = hashlib.sha256(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def backend_outputs(
    ready: dict, x: torch.Tensor, graphs: dict[str, Path], model: str, options, log
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({backend: logits}, {backend: store key of reused logits}) under ``options.store``
    (a ``ReportOptions``); without a store every backend runs."""
    if options.store is None:
        return {name: backend(x) for name, backend in ready.items()}, {}
    entries = Store(options.store, "outputs")
    v = versions()
    base = {
        "images": _images_digest(x),
        "code": _code_digest(),
        "versions": {k: v[k] for k in ("torch", "onnxruntime")},
        "threads": options.threads,
        "device": options.device,
    }
    graph_sha = {kind: atomic.sha256_file(path) for kind, path in graphs.items()}
    logits, reused = {}, {}
    for name, backend in ready.items():
        key = recipe_key({**base, "backend": name, "graph": graph_sha[GRAPH_OF.get(name, "qdq")]})
        out = entries.load(model, key, lambda f: load_file(f / _FILE)["logits"], log)
        if out is None:
            out = backend(x)
            entries.save(model, key, lambda f, out=out: save_file({"logits": out}, f / _FILE))
        else:
            reused[name] = key
        logits[name] = out
    return logits, reused
