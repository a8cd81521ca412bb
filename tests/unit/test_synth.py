import json
from pathlib import Path

import pytest
import torch

from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess
from clamp_export.synth import SynthConfig, generate, preset
from clamp_export.synth.config import PRESETS
from clamp_export.synth.generator import float_tap
from clamp_export.synth.losses import neighbour_index, patch_infonce, select_positives
from tests.conftest import make_tiny, requires_fmnist

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))


def test_neighbour_index_on_a_grid():
    index, valid = neighbour_index((3, 4))
    # centre-ish patch (1, 1) = flat 5: all 8 neighbours valid
    assert valid[5].all()
    assert sorted(index[5].tolist()) == [0, 1, 2, 4, 6, 8, 9, 10]
    # corner (0, 0): only right, below, diagonal
    assert sorted(index[0][valid[0]].tolist()) == [1, 4, 5]
    # edge (0, 2) = 2: 5 neighbours
    assert sorted(index[2][valid[2]].tolist()) == [1, 3, 5, 6, 7]


def test_positive_selection_on_a_hand_made_feature_map():
    # 3x3 grid; features chosen so the centre's most similar neighbours are known:
    # patches 1, 3 are identical to the centre, 5 is close, 7 is orthogonal, corners opposite.
    f = torch.zeros(1, 9, 2)
    f[0, 4] = torch.tensor([1.0, 0.0])
    f[0, 1] = f[0, 3] = torch.tensor([1.0, 0.0])
    f[0, 5] = torch.tensor([1.0, 0.2])
    f[0, 7] = torch.tensor([0.0, 1.0])
    f[0, [0, 2, 6, 8]] = torch.tensor([-1.0, 0.1])
    z = torch.nn.functional.normalize(f, dim=-1)
    sim = z @ z.transpose(1, 2)
    index, valid = neighbour_index((3, 3))
    pos, mask = select_positives(sim, index, valid, top_k=4)
    assert mask[0, 4].all()
    assert set(pos[0, 4].tolist()[:3]) == {1, 3, 5} and pos[0, 4, 3].item() == 7
    # corner 0 has 3 neighbours: the 4th positive is masked out
    assert mask[0, 0].tolist() == [True, True, True, False]


def test_infonce_prefers_neighbour_consistent_maps():
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, generator=g)
    smooth = torch.zeros(2, 16, 8)
    for i in range(16):  # a feature that varies slowly across the 4x4 grid
        y, x = divmod(i, 4)
        smooth[:, i, 0] = y
        smooth[:, i, 1] = x
        smooth[:, i, 2] = 5.0
    smooth = smooth + 0.01 * torch.randn(2, 16, 8, generator=g)
    l_noisy, s_noisy = patch_infonce(noisy, (4, 4), tau=0.2)
    l_smooth, s_smooth = patch_infonce(smooth, (4, 4), tau=0.2)
    assert s_smooth > s_noisy and l_smooth < l_noisy


def test_clamp_loss_falls_and_positive_similarity_rises():
    model = make_tiny()
    cfg = SynthConfig(method="clamp", n=4, steps=12, lr=0.1, seed=0)
    res = generate(model, PRE, cfg, progress=False)
    first, last = res.loss_curve[0], res.loss_curve[-1]
    assert last["patch"] < first["patch"]
    assert last["pos_sim"] > first["pos_sim"]
    assert res.images.shape == (4, 3, 16, 16) and torch.isfinite(res.images).all()
    lo, hi = PRE.pixel_bounds()
    assert (res.images >= lo - 1e-6).all() and (res.images <= hi + 1e-6).all()


@pytest.mark.parametrize(
    "timm_name,overrides",
    [
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}),
        ("vit_tiny_patch16_224", {"img_size": (16, 24)}),
    ],
    ids=["distilled-2-prefix", "registers", "nonsquare"],
)
def test_prefix_tokens_and_grids(timm_name, overrides):
    model = make_tiny(timm_name, **overrides)
    size = overrides.get("img_size", 16)
    h, w = (size, size) if isinstance(size, int) else size
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, h, w))
    tap = float_tap(model, timm_name)
    _, feats = tap(torch.randn(2, 3, h, w))
    assert len(feats) == 2
    assert feats[0].shape == (2, (h // 4) * (w // 4), 16)  # prefix tokens dropped, head dim 16
    res = generate(model, pre, SynthConfig(method="psaq", n=2, steps=3), progress=False)
    assert len(res.loss_curve) == 3


def test_determinism_with_a_seed():
    model = make_tiny()
    cfg = SynthConfig(method="clamp", n=2, steps=4, seed=3)
    a = generate(model, PRE, cfg, progress=False)
    b = generate(model, PRE, cfg, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    c = generate(model, PRE, SynthConfig(method="clamp", n=2, steps=4, seed=4), progress=False)
    assert not torch.equal(a.images, c.images)


def test_config_round_trip_and_presets():
    cfg = preset("fast", method="psaq", n=8, tau=None)
    assert SynthConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.steps == PRESETS["fast"].steps < PRESETS["default"].steps
    with pytest.raises(UserError, match="unknown synth method 'gan'"):
        SynthConfig(method="gan")
    with pytest.raises(UserError, match="--n must be at least 1"):
        SynthConfig(n=0)
    with pytest.raises(UserError, match="unknown preset"):
        preset("slow")


def test_absurd_n_is_refused_with_the_limit():
    with pytest.raises(UserError, match=r"--n 10000000 is more than .*at most 10000"):
        generate(make_tiny(), PRE, SynthConfig(n=10_000_000, steps=1), progress=False)
    wide = make_tiny(img_size=64, embed_dim=256, depth=8, num_heads=4)  # 257 tokens
    wide_pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 64, 64))
    with pytest.raises(UserError, match=r"too large for memory.*at most \d+ images"):
        generate(wide, wide_pre, SynthConfig(n=9_000, steps=1), progress=False)


def test_model_without_attention_output():
    model = make_tiny()
    model.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(UserError, match="exposes no attention output.*blocks.0.attn"):
        generate(model, PRE, SynthConfig(n=2, steps=1), name="tiny", progress=False)


def test_divergence_names_the_step():
    # finite in Python, past float32's range in the loss: the run, not the config, goes wrong
    with pytest.raises(UserError, match=r"diverged: loss became inf at step 0"):
        generate(make_tiny(), PRE, SynthConfig(n=2, steps=3, w_tv=1e39), progress=False)


def test_nan_settings_are_refused_where_they_enter():
    with pytest.raises(UserError, match="synth w_tv must be a finite number, got nan"):
        SynthConfig(w_tv=float("nan"))


def test_synth_cli_writes_files_and_reuses_the_cache(tiny_weights, tmp_path):
    from PIL import Image

    from tests.unit.test_cli_errors import run_cli

    _, args = tiny_weights
    common = [*args, "--n", "4", "--steps", "5", "--cache-dir", str(tmp_path / "cache")]
    first = run_cli("synth", args[0], *common[1:], "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "reusing" not in first.stderr and "generated 4 clamp images" in first.stderr
    out = tmp_path / "a"
    record = json.loads((out / "synth.json").read_text())
    assert (
        record["n"] == 4
        and len(record["loss_curve"]) == 5
        and 0 <= record["misprediction_rate"] <= 1
    )
    assert record["config"]["steps"] == 5 and record["config"]["method"] == "clamp"
    png = Image.open(out / "grid.png")
    assert png.format == "PNG" and png.size[0] >= 2 * 16
    second = run_cli("synth", args[0], *common[1:], "--out", str(tmp_path / "b"))
    assert second.returncode == 0 and "reusing cached synthetic set" in second.stderr
    assert "(reused from cache)" in second.stdout
    assert (tmp_path / "b" / "images.safetensors").read_bytes() == (
        out / "images.safetensors"
    ).read_bytes()
    bad = run_cli("synth", args[0], *common[1:], "--method", "gan", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "unknown synth method 'gan'" in bad.stderr


@requires_fmnist
@pytest.mark.parametrize("model", ["fmnist_vit", "fmnist_vit_reg4"])
@pytest.mark.parametrize("method", ["clamp", "psaq"])
def test_benchmark_reference_sets_match_the_current_cache_key(method, model):
    """The committed Stage 1 sets stay reachable: a change to the model's identity, its
    preprocessing or the default Stage 1 config moves the key, and the benchmarks would silently
    regenerate (and disagree with their stored cells)."""
    from clamp_export.models import load_model
    from clamp_export.synth import cached_folder
    from clamp_export.synth.store import read_set

    root = Path(__file__).resolve().parents[2] / "calib" / "reference"
    loaded = load_model(model)
    for seed in (0, 1, 2):
        cfg = preset("default", method=method, n=32, seed=seed)
        folder = cached_folder(loaded, cfg, root)
        assert folder is not None and (folder / "synth.json").is_file(), (
            f"no reference set for {method} seed {seed} at {folder}"
        )
        result, record = read_set(folder)
        assert result.config == cfg and record["weights_sha256"] == loaded.weights_sha256
        assert result.images.shape == (32, *loaded.preprocess.input_size)
        assert torch.isfinite(result.images).all()
