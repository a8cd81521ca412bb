import json

import pytest
import torch

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.equalize import (
    applied_equalization,
    apply_equalization,
    equalization_factors,
    equalized,
)
from clamp_export.quant.fakequant import collect_qparams, load_qparams, wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import get_profile
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from clamp_export.search import prepare_equalization, preset
from tests.conftest import make_tiny

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))


def _outlier_vit() -> torch.nn.Module:
    """A tiny ViT with the uneven channels of a trained one (random init has none)."""
    model = make_tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.blocks:
            for ln in (blk.norm1, blk.norm2):
                ln.weight.copy_(torch.exp(torch.randn(ln.weight.shape, generator=g)))
                ln.weight[3] = 12.0  # one outlier channel, as in trained ViTs' LayerNorms
                ln.bias.copy_(0.3 * torch.randn(ln.bias.shape, generator=g))
            w = blk.attn.qkv.weight
            w.mul_(torch.exp(torch.randn(w.shape[0], 1, generator=g)))
    return model.eval()


def _amax(model, images, hook_on):
    out = {}
    h = hook_on(model).register_forward_hook(
        lambda m, a, o: out.__setitem__("x", o.flatten(0, -2).abs().amax(0))
    )
    with torch.no_grad():
        model(images)
    h.remove()
    return out["x"]


def test_equalization_is_exact_in_float_and_evens_out_the_ranges():
    model, x = _outlier_vit(), noise_images(16, PRE, seed=0)
    factors = equalization_factors(model, x)
    assert set(factors) == {"blocks.0", "blocks.1"}
    assert set(factors["blocks.0"]) == {"norm1", "norm2", "qk", "v"}
    eq = equalized(model, factors)
    assert applied_equalization(model) == {}  # the original is untouched
    with torch.no_grad():
        ref, out = model(x), eq(x)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()

    c = 32
    ln_before = _amax(model, x, lambda m: m.blocks[0].norm1)
    ln_after = _amax(eq, x, lambda m: m.blocks[0].norm1)
    assert ln_before.max() / ln_before.min() > 10
    assert torch.allclose(ln_after, ln_after.mean().expand_as(ln_after), rtol=1e-4)
    qkv = _amax(eq, x, lambda m: m.blocks[0].attn.qkv)
    q, k, v = qkv[:c], qkv[c : 2 * c], qkv[2 * c :]
    assert torch.allclose(q, k, rtol=1e-4)  # q and k meet at their geometric mean
    assert torch.allclose(v, v.mean().expand_as(v), rtol=1e-4)


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_equalization_cuts_the_activation_error_of_an_outlier_model(target):
    # 8-bit weights isolate the activations: narrow per-tensor ranges are what it is for
    # (with 4-bit weights the widened weight columns give part of the gain back)
    model, x = _outlier_vit(), noise_images(32, PRE, seed=0)
    test = noise_images(64, PRE, seed=9)
    spec, profile = BitsSpec.parse("w8a6"), get_profile(target)
    with torch.no_grad():
        ref = model(test)
        errors = [
            (calibrate(wrap_model(m, spec, profile), x)(test) - ref).abs().mean()
            for m in (model, equalized(model, equalization_factors(model, x)))
        ]
    assert errors[1] < 0.6 * errors[0]  # measured: 0.45 of it on both targets


@pytest.mark.parametrize("target,bits", [("ort", "w4a4"), ("trt", "w4a4"), ("trt", "w8a8")])
def test_factors_travel_in_qparams_and_rebuild_the_same_model(tmp_path, target, bits):
    model, x = _outlier_vit(), noise_images(16, PRE, seed=0)
    spec, profile = BitsSpec.parse(bits), get_profile(target)
    qm = wrap_model(model, spec, profile)
    ref_fp = prepare_equalization(model, qm, x, preset("default", equalize=True))
    assert applied_equalization(ref_fp) == applied_equalization(qm) != {}
    calibrate(qm, x)
    qp = collect_qparams(qm, model="tiny", target=target, bits=bits)
    assert qp.equalization == equalization_factors(model, x)
    qp.validate(profile)
    path = tmp_path / "qparams.json"
    qp.save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 5 and set(raw["equalization"]["blocks.1"]) == {
        "norm1",
        "norm2",
        "qk",
        "v",
    }
    # a reader starts from the original float model, as export and parity do
    fresh = load_qparams(wrap_model(model, spec, profile), QParams.load(path))
    test = noise_images(8, PRE, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh(test), qm(test))
    load_qparams(fresh, QParams.load(path))  # loading again does not rewrite the model twice
    with torch.no_grad():
        assert torch.equal(fresh(test), qm(test))
    # and the exported graph computes what the fake-quant model computes
    onnx_path = tmp_path / "m.onnx"
    export_qdq(fresh, PRE.input_size, profile, onnx_path)
    fq, ort = TorchRunner(fresh, "fq")(test), OrtRunner(onnx_path)(test)
    assert torch.equal(fq.argmax(1), ort.argmax(1))
    if profile.float_dtype == "float32":
        assert (fq - ort).abs().max() < 1e-4


def test_qparams_without_factors_keep_the_old_layout(tiny_vit):
    qm = calibrate(
        wrap_model(tiny_vit, BitsSpec.parse("w8a8"), get_profile("ort")), noise_images(4, PRE)
    )
    d = collect_qparams(qm, model="tiny", target="ort", bits="w8a8").to_dict()
    assert "equalization" not in d
    assert preset("default", equalize=False).to_dict() == {
        k: v for k, v in preset("default", equalize=True).to_dict().items() if k != "equalize"
    }


def test_mismatched_factors_are_refused():
    model, x = _outlier_vit(), noise_images(8, PRE, seed=0)
    factors = equalization_factors(model, x)
    spec, profile = BitsSpec.parse("w4a8"), get_profile("ort")
    qm = calibrate(wrap_model(equalized(model, factors), spec, profile), x)
    qp = collect_qparams(qm, model="tiny", target="ort", bits="w4a8")

    other = {"blocks.0": {"norm1": [2.0] * 32}}
    with pytest.raises(UserError, match="already equalized with other factors"):
        apply_equalization(qm, other)
    with pytest.raises(UserError, match="already equalized"):
        load_qparams(qm, QParams(**{**qp.__dict__, "equalization": {}}))

    short = {"blocks.0": {"v": [1.0] * 31}}
    with pytest.raises(UserError, match="31 equalization factors for 32 channels"):
        apply_equalization(equalized(model, {}), short)
    with pytest.raises(UserError, match="does not have"):
        apply_equalization(make_tiny(), {"blocks.7": {"v": [1.0] * 32}})
    with pytest.raises(UserError, match="cannot be equalized exactly"):
        apply_equalization(make_tiny(qk_norm=True), {"blocks.0": {"qk": [1.0] * 32}})

    bad = QParams(**{**qp.__dict__, "equalization": {"blocks.0": {"v": [1.0, -2.0], "up": [1.0]}}})
    problems = bad.violations(profile)
    assert any("finite and positive" in p for p in problems)
    assert any("unknown equalization role" in p for p in problems)
    with pytest.raises(UserError, match="malformed qparams.json"):
        QParams.from_dict({**qp.to_dict(), "equalization": [1.0]})


@pytest.mark.e2e  # a CLI search run: CI runs it, make test-fast does not
def test_cli_equalizes_below_8_bit_activations_and_reloads_the_same_model(tiny_weights, tmp_path):
    from tests.unit.test_cli_errors import run_cli

    _, model_args = tiny_weights
    common = [*model_args, "--target", "trt", "--no-engine", "--calib-size", "4"]
    search = ["--calib", "clamp", "--synth-preset", "fast", "--search-preset", "fast"]
    search += ["--cache-dir", str(tmp_path / "cache")]
    runs = {
        "a4": [*common, *search, "--bits", "w4a4"],
        "a8": [*common, *search, "--bits", "w4a8"],
        "a4-off": [*common, *search, "--bits", "w4a4", "--no-equalize"],
        "reload": [*common, "--bits", "w4a4", "--qparams", str(tmp_path / "a4" / "qparams.json")],
    }
    out = {}
    for name, args in runs.items():
        proc = run_cli(*args, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        out[name] = (
            json.loads((tmp_path / name / "qparams.json").read_text())
            if name != "reload"
            else None,
            json.loads((tmp_path / name / "report.json").read_text()),
        )
    qp = out["a4"][0]
    assert qp["metadata"]["search"]["config"]["equalize"] is True
    assert set(qp["equalization"]) == {"blocks.0", "blocks.1"}
    for name in ("a8", "a4-off"):  # on by default only below 8-bit activations
        assert "equalization" not in out[name][0]
        assert "equalize" not in out[name][0]["metadata"]["search"]["config"]
    # --qparams rebuilds the equalized model: the same deployed graph, the same parity numbers
    reload, a4 = out["reload"][1]["backends"], out["a4"][1]["backends"]
    assert reload["ort-qdq"]["logit_error"] == a4["ort-qdq"]["logit_error"]
