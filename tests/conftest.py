from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from clamp_export.models import registry

# CLI runs in the tests keep their store in a folder of their own, never the checkout's calib/
os.environ["CLAMP_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="clamp-export-test-store-")
# the latency sweep's minimum duration per batch: its run count alone is enough for a test
os.environ["CLAMP_EXPORT_DURATION"] = "0"

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def make_tiny(timm_name: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = registry.ModelSpec(timm_name, kwargs={**TINY, **overrides})
    model = registry.create(spec, pretrained=False)
    # Random init leaves near-identical logits; widen them so top-1 comparisons mean something.
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_tiny()


@pytest.fixture
def tiny_weights(tmp_path):
    """A safetensors file for vit_tiny_patch16_224 at the TINY architecture, and its CLI args."""
    model = make_tiny()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    args = ["vit_tiny_patch16_224", "--weights", str(path)]
    for k, v in TINY.items():
        if k in ("img_size", "num_classes"):
            args += [f"--{k.replace('_', '-')}", str(v)]
        else:
            args += ["--model-arg", f"{k}={v}"]
    return path, args


requires_trt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None
    and importlib.util.find_spec("tensorrt_rtx") is None,
    reason="neither tensorrt nor tensorrt_rtx is installed",
)
requires_fmnist = pytest.mark.skipif(
    not (registry.REFERENCE_DIR / "fmnist_vit.safetensors").is_file(),
    reason="reference weights not trained yet",
)
