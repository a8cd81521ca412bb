import pytest
import torch
from safetensors.torch import save_file

from clamp_export.errors import UserError
from clamp_export.models import load_model, parse_model_args
from clamp_export.models.weights import load_weights
from tests.conftest import TINY, make_tiny

ARGS = {k: v for k, v in TINY.items() if k not in ("num_classes", "img_size")}


def _load(path, **kw):
    return load_model(
        "vit_tiny_patch16_224", path, num_classes=5, img_size=16, model_args=ARGS, **kw
    )


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "checkpoint-model", "checkpoint-state_dict"])
def test_weight_formats_load_exactly(tmp_path, fmt):
    src = make_tiny()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DDP prefix is stripped
    else:
        torch.save({fmt.split("-")[1]: state, "epoch": 3}, path)
    loaded = _load(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src(x))
    assert loaded.weights == str(path) and len(loaded.weights_sha256) == 64


def test_corrupt_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt"):
        _load(path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = make_tiny().state_dict()
    state["extra.weight"] = state.pop("blocks.1.mlp.fc2.weight")
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(
        UserError,
        match=r"missing keys \['blocks.1.mlp.fc2.weight'\].*unexpected keys \['extra.weight'\]",
    ):
        _load(path)


def test_num_classes_contradicting_weights(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(make_tiny().state_dict(), path)
    with pytest.raises(
        UserError,
        match="have 5 classes but the model has 7; drop --num-classes or pass --num-classes 5",
    ):
        load_model("vit_tiny_patch16_224", path, num_classes=7, img_size=16, model_args=ARGS)


def test_shape_mismatch_names_tensor(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(make_tiny().state_dict(), path)
    model = make_tiny(mlp_ratio=2.0)
    with pytest.raises(
        UserError, match=r"another architecture \(file vs model: MLP width 128 vs 64\)"
    ):
        load_weights(model, path)
    torch.save({**make_tiny().state_dict(), "head.bias": torch.zeros(7)}, path)
    with pytest.raises(UserError, match=r"head.bias is \(7,\) in the file but \(5,\)"):
        load_weights(make_tiny(), path)


def test_model_args_parse():
    assert parse_model_args(["depth=2", "qk_norm=True", "act_layer=gelu"]) == {
        "depth": 2,
        "qk_norm": True,
        "act_layer": "gelu",
    }
    with pytest.raises(UserError, match="malformed --model-arg"):
        parse_model_args(["depth"])
