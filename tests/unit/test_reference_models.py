"""The shipped reference models: bundled weights, their training record, and their accuracy."""

import json

import pytest
import torch

from clamp_export.data.fashion_mnist import load_fashion_mnist
from clamp_export.models import load_model, registry


@pytest.mark.parametrize("name", registry.REFERENCE_MODELS)
def test_reference_model_loads_its_weights_and_holds_its_recorded_accuracy(name):
    spec = registry.ALIASES[name]
    record = json.loads((registry.REFERENCE_DIR / f"{name}.json").read_text())
    assert record["kwargs"] == spec.kwargs and record["timm_name"] == spec.timm_name
    assert record["test_top1"] >= 0.885
    loaded = load_model(name)
    assert loaded.weights == f"bundled:{name}.safetensors"
    x, y = load_fashion_mnist("test")
    x, y = x[:2000], torch.from_numpy(y[:2000])
    images = loaded.preprocess.normalize(torch.tensor(x).float().div(255).unsqueeze(1))
    with torch.inference_mode():
        top1 = float((loaded.model(images).argmax(1) == y).float().mean())
    assert abs(top1 - record["test_top1"]) < 0.02  # 2000 of the 10k images the record counts


def test_the_two_reference_models_differ_in_shape():
    a, b = (load_model(n).model for n in registry.REFERENCE_MODELS)
    assert (a.num_prefix_tokens, b.num_prefix_tokens) == (1, 5)  # class token; + 4 registers
    assert len(a.blocks) != len(b.blocks) and a.embed_dim != b.embed_dim
    assert a.blocks[0].attn.head_dim != b.blocks[0].attn.head_dim
