import pytest
import torch

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import load_qparams, wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from clamp_export.search import SearchConfig, run_search
from clamp_export.search.driver import model_evaluator
from clamp_export.search.mixed import (
    _block_points,
    allocate,
    budget_to_weight_bits,
    packed_mb,
)
from tests.conftest import make_tiny

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
CFG = SearchConfig(passes=1, cycles=2, population=4, cyclic=False)


def _mixed(target: str, w: float, a: float | None):
    model = make_tiny()
    x = noise_images(8, PRE)
    profile = get_profile(target)
    qm = calibrate(wrap_model(model, BitsSpec.parse("mp:8"), profile), x)
    alloc = allocate(qm, model_evaluator(CFG, model, qm, x), profile, w, a)
    return model, qm, x, alloc


def test_bits_spec_parses_mixed_precision():
    b = BitsSpec.parse("mp:4.7x6")
    assert (b.mixed, b.mp_weight, b.mp_act, str(b)) == (True, 4.7, 6.0, "mp:4.7x6")
    assert str(BitsSpec.parse("MP:3.5")) == "mp:3.5" and BitsSpec.parse("mp:3.5").mp_act is None
    with pytest.raises(UserError, match="mixed-precision averages must lie in 2..8"):
        BitsSpec.parse("mp:1.5")


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_set_bits_equals_calibrating_at_those_bits(target):
    """Re-widthing a calibrated model gives exactly the model calibrated at the new widths.

    Regression: weight quantizers kept their 8-bit scale (clipping everything past 7/127 of the
    range at 4 bits) and their cached fake-quant weight, so mp:4.7 and mp:3.5 measured the same.
    """
    model, x = make_tiny(), noise_images(8, PRE)
    profile = get_profile(target)
    qm = calibrate(wrap_model(model, BitsSpec.parse("w8a8"), profile), x)
    ref = calibrate(wrap_model(model, BitsSpec.parse("w4a6"), profile), x)
    with torch.inference_mode():
        y8 = qm(x)  # fills the fake-quant weight caches at 8 bits
        for name, mod in qm.named_modules():
            if name.startswith("blocks.") and hasattr(mod, "weight_q"):
                mod.weight_q.set_bits(4)
        for _, q in _block_points(qm)[1]:
            q.set_bits(6)
        y4 = qm(x)
        assert torch.equal(y4, ref(x))
        assert not torch.equal(y4, y8)


def test_allocation_follows_the_measured_cost():
    """Two budgets give two models, and the tighter one costs more fitness."""
    fits = []
    for w in (6.0, 3.0):
        model, qm, x, alloc = _mixed("trt", w, None)
        fits.append(model_evaluator(CFG, model, qm, x)())
        assert alloc.avg_weight_bits <= w + 1e-9
    assert fits[1] > fits[0]


@pytest.mark.parametrize("w,a", [(4.7, None), (3.5, 6.0)])
def test_allocation_respects_the_budget(w, a):
    _, qm, _, alloc = _mixed("trt", w, a)
    assert alloc.avg_weight_bits <= w + 1e-9
    assert alloc.avg_weight_bits > w - 1.0  # it spends the budget rather than dropping everything
    assert len(set(alloc.weight_bits.values())) > 1  # genuinely mixed
    if a is not None:
        assert alloc.avg_act_bits <= a + 1e-9
    else:
        assert alloc.avg_act_bits == 8
    assert qm.patch_embed.proj.weight_q.bits == 8 and qm.head.weight_q.bits == 8


def test_impossible_budgets_name_the_minimum():
    model = make_tiny()
    qm = calibrate(
        wrap_model(model, BitsSpec.parse("mp:8"), get_profile("trt")), noise_images(4, PRE)
    )
    with pytest.raises(UserError, match="minimum average is 2"):
        allocate(qm, lambda: 0.0, get_profile("trt"), 1.0, None)
    with pytest.raises(UserError, match=r"--budget-mb 0.001 is impossible.*minimum budget is"):
        budget_to_weight_bits(qm, 0.001, get_profile("trt"))
    at8 = packed_mb(qm, "float16")
    assert (
        3.9
        < budget_to_weight_bits(qm, at8 - 0.75 * (at8 - packed_mb_at(qm, 4)), get_profile("trt"))
        < 8
    )


def packed_mb_at(qm, bits):
    from clamp_export.search.mixed import _block_points

    for _, q, _ in _block_points(qm)[0]:
        q.set_bits(bits)
    mb = packed_mb(qm, "float16")
    for _, q, _ in _block_points(qm)[0]:
        q.set_bits(8)
    return mb


def test_searched_mixed_model_exports_lints_and_matches_ort(tmp_path):
    model, qm, x, _ = _mixed("ort", 4.0, 6.0)
    qp, _, _ = run_search(
        model,
        qm,
        x,
        CFG,
        {"model": "t", "target": "ort", "bits": "mp:4x6"},
        PRE.pixel_bounds(),
        progress=False,
    )
    assert {p.bits for _, r, p in qp.points() if r == "weight"} > {8}
    fresh = load_qparams(wrap_model(model, BitsSpec.parse("mp:4x6"), get_profile("ort")), qp)
    proto = export_qdq(fresh, PRE.input_size, get_profile("ort"), tmp_path / "m.onnx")
    assert lint(proto, get_profile("ort")) == []
    probe = noise_images(200, PRE, seed=4)
    ref, out = TorchRunner(fresh, "fq")(probe), OrtRunner(tmp_path / "m.onnx")(probe)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.995
    assert (out - ref).abs().max() < 1e-3
    with torch.no_grad():
        assert not torch.equal(fresh(probe), model(probe))
