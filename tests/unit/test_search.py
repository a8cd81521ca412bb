import ast
import inspect
import json
import math

import pytest
import torch

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import load_qparams, quantizers, wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from clamp_export.search import SearchConfig, driver, prepare_equalization, preset, run_search
from clamp_export.search.config import REFINE_LOSS, REFINE_LOSSES, REFINE_SHIFT, REFINE_STEPS
from clamp_export.search.fitness import local_contrastive
from clamp_export.search.refine import (
    DISTILLATION_LOSSES,
    distillation_loss,
    feature_loss,
    flipped,
    logprob_mse,
    shift_pixels,
    shifted,
)
from tests.conftest import make_tiny

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
SMALL = dict(passes=2, cycles=2, population=4)
HEADER = {"model": "tiny", "target": "ort", "bits": "w4a4"}


def _search(
    target="ort",
    bits="w4a4",
    run_dir=None,
    resume=False,
    stop_after=None,
    softmax="uniform",
    **cfg,
):
    torch.manual_seed(0)
    model = make_tiny()
    x = noise_images(8, PRE)
    qm = wrap_model(model, BitsSpec.parse(bits), get_profile(target), softmax)
    scfg = SearchConfig(**{**SMALL, "cyclic": False, **cfg})
    fp = prepare_equalization(model, qm, x, scfg)
    calibrate(qm, x)
    header = {**HEADER, "target": target, "bits": bits}
    qp, images, log = run_search(
        fp,
        qm,
        x,
        scfg,
        header,
        PRE.pixel_bounds(),
        run_dir=run_dir,
        resume=resume,
        progress=False,
        stop_after=stop_after,
        identity={"model": "tiny"},
    )
    return model, qm, qp, images, log


def test_local_contrastive_prefers_matching_samples():
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(6, 5, 8, generator=g)
    assert local_contrastive(fp, fp, 0.2) < local_contrastive(
        fp[torch.randperm(6, generator=g)], fp, 0.2
    )


def test_fitness_never_rises():
    _, _, _, _, log = _search(passes=3)
    fits = [p["fitness"] for p in log.passes]
    assert len(fits) == 3 and all(b <= a + 1e-9 for a, b in zip(fits, fits[1:], strict=False))
    assert all(rec["after"] <= rec["before"] + 1e-9 for rec in log.layers)
    assert any(rec["after"] < rec["before"] - 1e-6 for rec in log.layers)  # it does improve things


def test_paper_fitness_lowers_output_error_below_min_max(tiny_vit):
    # L_O is in the paper's fitness only; the default (L_C2 alone) is checked by the test above
    model, qm, _, images, _ = _search(passes=2, fitness="both")
    base = calibrate(wrap_model(model, BitsSpec.parse("w4a4"), get_profile("ort")), images)
    with torch.no_grad():
        fp = model(images)
        assert (qm(images) - fp).abs().mean() < (base(images) - fp).abs().mean()


def test_trt_search_keeps_zero_points_at_zero():
    _, _, qp, _, _ = _search(target="trt")
    assert all(z == 0 for _, _, p in qp.points() for z in p.zero_point)
    qp.validate(get_profile("trt"))
    _, _, qp_ort, _, _ = _search(target="ort", zp_mutation=1.0)
    assert qp_ort.violations(get_profile("ort")) == []


def test_twin_softmax_keeps_its_data_free_levels_through_the_search():
    # cyclic refinement takes its gradient through both parts (straight-through)
    _, _, qp, _, log = _search(target="trt", softmax="twin", cyclic=True, refresh_steps=1)
    soft = [p for _, role, p in qp.points() if role == "attn"]
    assert len(soft) == 2
    assert all(p.twin and p.scale == [float(torch.tensor(1 / 56).half())] for p in soft)
    qp.validate(get_profile("trt"))
    assert log.refreshes > 0 and not any(rec["after"] > rec["before"] + 1e-9 for rec in log.layers)
    fits = [p["fitness"] for p in log.passes]
    assert len(fits) == 2 and all(map(math.isfinite, fits))


@pytest.mark.parametrize("equalize", [False, True])
def test_resume_after_kill_matches_uninterrupted(tmp_path, equalize):
    kw = dict(cyclic=True, refresh_steps=1, equalize=equalize, refine_steps=3)
    _, _, full, full_images, _ = _search(run_dir=tmp_path / "a", **kw)
    _search(run_dir=tmp_path / "b", stop_after=7, **kw)  # "killed" after 7 layers
    ckpt = driver.read_checkpoint(tmp_path / "b" / driver.CHECKPOINT)
    assert ckpt["next"] == 7
    assert bool(ckpt["qparams"].get("equalization")) == equalize
    _, _, resumed, resumed_images, log = _search(run_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.to_dict() == full.to_dict()
    assert torch.equal(resumed_images, full_images)
    assert len(log.layers) == 2 * 12  # the records from before the kill are kept


@pytest.mark.parametrize(("target", "shift"), [("ort", 0.0), ("trt", 0.0), ("ort", 0.15)])
def test_scale_refinement_lowers_the_logit_kl_and_keeps_integers_and_profile(target, shift):
    _, qm, refined, images, log = _search(
        target=target, refine_steps=15, refine_lr=0.01, refine_shift=shift
    )
    assert log.refine["steps"] == 15 and log.refine["kl_after"] < 0.9 * log.refine["kl_before"]
    refined.validate(get_profile(target))
    _, _, searched, _, plain = _search(target=target)
    assert plain.refine is None
    pairs = [
        (a, b) for (_, _, a), (_, _, b) in zip(refined.points(), searched.points(), strict=True)
    ]
    assert all(a.zero_point == b.zero_point and a.window == b.window for a, b in pairs)
    assert sum(a.scale != b.scale for a, b in pairs) > 0.9 * len(pairs)  # every scale learns
    assert all(q.log_scale is None for _, _, q in quantizers(qm))  # the trainable copies are gone


def test_shifted_images_are_translated_copies_within_the_bound():
    images = torch.arange(4 * 2 * 6 * 6, dtype=torch.float32).view(4, 2, 6, 6)
    gen = torch.Generator().manual_seed(0)
    assert shifted(images, 0, gen) is images
    out = torch.cat([shifted(images, 2, gen) for _ in range(8)])
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="replicate").repeat(8, 1, 1, 1)
    offsets = [
        next(
            (i, j) for i in range(5) for j in range(5) if torch.equal(p[:, i : i + 6, j : j + 6], o)
        )
        for p, o in zip(padded, out, strict=True)
    ]
    assert len(set(offsets)) > 10  # drawn per image, both axes, not one shift for the batch
    again = shifted(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, out[:4])  # the seed decides the draws
    assert [shift_pixels(images, f) for f in (0.0, 0.01, 0.34)] == [0, 1, 2]


def test_shifted_refinement_is_deterministic_per_seed():
    kw = dict(refine_steps=4, refine_lr=0.01, refine_shift=0.15, passes=1)
    a, b = (_search(**kw)[2].to_dict() for _ in range(2))
    other = _search(**kw, seed=1)[2].to_dict()
    assert a == b and a != other


def test_flipped_images_are_mirrored_at_random_per_image():
    images = torch.arange(8 * 2 * 5 * 6, dtype=torch.float32).view(8, 2, 5, 6)
    gen = torch.Generator().manual_seed(0)
    out = torch.cat([flipped(images, gen) for _ in range(4)])
    pairs = list(zip(out, images.repeat(4, 1, 1, 1), strict=True))
    mirrored = [torch.equal(o, x.flip(-1)) for o, x in pairs]
    kept = [torch.equal(o, x) for o, x in pairs]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # the image or its mirror
    assert 8 < sum(mirrored) < 24  # about half, drawn per image
    assert torch.equal(flipped(images, torch.Generator().manual_seed(0)), out[:8])


def test_flipped_refinement_changes_scales_deterministically_and_round_trips():
    kw = dict(refine_steps=4, refine_lr=0.01, refine_shift=0.15, passes=1)
    plain = _search(**kw)[2].to_dict()
    flip, again = (_search(**kw, refine_flip=True)[2].to_dict() for _ in range(2))
    assert flip == again and flip != plain
    cfg = SearchConfig(refine_steps=4, refine_flip=True)
    assert cfg.to_dict()["refine_flip"] is True
    assert SearchConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert "refine_flip" not in SearchConfig(refine_steps=4).to_dict()  # stored records keep keys


@pytest.mark.parametrize(
    ("bits", "low", "fitness"),
    [
        ("w4a4", True, "contrastive"),
        ("w4a6", True, "contrastive"),
        ("w4a8", False, "both"),  # L_C2 saturates at 8-bit activations: L_O joins it
        ("w8a8", False, "both"),
        ("mp:4.7", False, "contrastive"),  # mixed precision: not measured, L_C2 kept
    ],
)
def test_presets_equalize_and_refine_below_8_bit_activations(bits, low, fitness):
    cfg = preset("default", BitsSpec.parse(bits))
    expected = (
        (True, REFINE_STEPS, REFINE_SHIFT, REFINE_LOSS, fitness)
        if low
        else (False, 0, 0.0, "kl", fitness)
    )
    assert (
        cfg.equalize,
        cfg.refine_steps,
        cfg.refine_shift,
        cfg.refine_loss,
        cfg.fitness,
    ) == expected
    assert preset("default", BitsSpec.parse(bits), fitness="output").fitness == "output"
    assert ("refine_steps" in cfg.to_dict()) == low  # records made before the field keep their keys
    assert ("refine_shift" in cfg.to_dict()) == low
    assert cfg.to_dict().get("refine_loss") == ("logprob_mse" if low else None)
    assert SearchConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert (
        preset("default", BitsSpec.parse(bits), refine_steps=7).refine_steps == 7
    )  # --refine-steps


def test_weight_only_preset_refines_on_the_kl_it_was_measured_with():
    cfg = preset("default", BitsSpec.parse("w4a16"))
    assert (cfg.refine_steps, cfg.refine_loss, cfg.equalize) == (REFINE_STEPS, "kl", False)
    assert "refine_loss" not in cfg.to_dict()  # the stored w4a16 cells keep their keys


def test_resume_refuses_another_config_and_reports_corruption(tmp_path):
    _search(run_dir=tmp_path, stop_after=2)
    with pytest.raises(UserError, match=r"cannot resume .* another search"):
        _search(run_dir=tmp_path, resume=True, population=5)
    (tmp_path / driver.CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt.*run without --resume to restart"):
        _search(run_dir=tmp_path, resume=True)


def test_search_cannot_reach_evaluation_data(monkeypatch):
    import clamp_export.data.fashion_mnist as fm
    import clamp_export.data.folder as folder
    import clamp_export.data.sources as sources

    def forbidden(*a, **k):
        raise AssertionError("the search touched a dataset")

    for mod, name in [
        (fm, "load_fashion_mnist"),
        (sources, "load_images"),
        (folder, "load_image_folder"),
    ]:
        monkeypatch.setattr(mod, name, forbidden)
    _search(passes=1, cyclic=True, refresh_steps=1)
    # and statically: the search package imports no data loader
    import clamp_export.search as pkg

    for mod in (driver, pkg.evolution, pkg.fitness, pkg.stages):
        tree = ast.parse(inspect.getsource(mod))
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(m and m.startswith("clamp_export.data") for m in names), mod.__name__


def test_searched_model_exports_with_parity(tmp_path):
    model, qm, qp, images, _ = _search(target="trt", bits="w4a8")
    assert (
        lint(
            export_qdq(qm, PRE.input_size, get_profile("trt"), tmp_path / "t.onnx"),
            get_profile("trt"),
        )
        == []
    )
    _, qm_ort, qp_ort, _, _ = _search(target="ort", bits="w4a8", equalize=True)
    assert set(qp_ort.equalization) == {"blocks.0", "blocks.1"}
    fresh = load_qparams(wrap_model(model, BitsSpec.parse("w4a8"), get_profile("ort")), qp_ort)
    export_qdq(fresh, PRE.input_size, get_profile("ort"), tmp_path / "o.onnx")
    x = noise_images(200, PRE, seed=9)
    ref, out = TorchRunner(fresh, "fq")(x), OrtRunner(tmp_path / "o.onnx")(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.995


def test_scan_reaches_a_range_that_mutation_cannot():
    """A quantizer whose best scale is 4x below min-max: the scan lands on it, mutation alone not."""
    from clamp_export.quant.fakequant import Quantizer
    from clamp_export.search.evolution import evolve_layer

    x = torch.cat([torch.linspace(0, 0.25, 999), torch.ones(1)])  # one outlier sets min-max
    q = Quantizer(4, signed=True, symmetric=True)
    q.set_params(torch.tensor([1 / 7]), torch.zeros(1, dtype=torch.int32))
    q.mode = "quant"

    def err() -> float:
        return float((q(x) - x).abs().mean())

    def search(scan) -> float:
        q.set_params(torch.tensor([1 / 7]), torch.zeros(1, dtype=torch.int32))
        _, after = evolve_layer(
            [q], err, 2, 4, 2, 0.08, 0.0, torch.Generator().manual_seed(0), scan=scan
        )
        assert after == pytest.approx(err())  # the best genome is the one left installed
        return float(q.scale)

    assert search(()) > 1 / 7 * 0.7  # a few 8% steps stay near min-max
    assert search((0.25, 0.4, 0.6, 0.8, 1.25)) < 1 / 7 * 0.5


def test_channel_scan_lowers_each_channels_output_error():
    from clamp_export.quant.fakequant import Quantizer, QuantLinear
    from clamp_export.quant.math import params_from_range
    from clamp_export.search.channels import scan_weight_channels

    torch.manual_seed(0)
    ql = QuantLinear(torch.nn.Linear(32, 16), Quantizer(8, True, True), Quantizer(4, True, True, 0))
    x = torch.randn(256, 32)
    for q, t in ((ql.input_q, x), (ql.weight_q, ql.weight.detach())):
        lo, hi = (t.amin(1), t.amax(1)) if q.is_weight else (t.min(), t.max())
        q.set_params(*params_from_range(lo, hi, q.qmin, q.qmax, True))
        q.mode = "quant"

    def channel_errors() -> torch.Tensor:
        xq = ql.input_q(x)
        return ((xq @ ql.weight_q(ql.weight).T - xq @ ql.weight.T) ** 2).mean(0).detach()

    before, scale_before = channel_errors(), ql.weight_q.scale.clone()
    scan_weight_channels(ql, x, (0.5, 0.6, 0.7, 0.8, 0.9, 1.1))
    after = channel_errors()
    assert (after <= before).all()
    assert after.sum() < 0.9 * before.sum()  # 4-bit min-max wastes levels on each row's outlier
    moved = ~torch.isclose(ql.weight_q.scale, scale_before)
    assert 0 < int(moved.sum()) < 16  # chosen per channel, not one multiplier for all


def test_channel_scan_alone_lowers_the_fitness_of_min_max():
    """Population 1 and no activation scan: the channel scan is the only move the search makes."""
    alone = dict(passes=1, cycles=1, population=1, scan=())
    _, _, qp, _, log = _search(**alone)
    _, _, qp0, _, log0 = _search(**alone, channel_scan=())
    assert log.passes[0]["fitness"] < log0.passes[0]["fitness"]
    moved = {(r == "weight") for n, r, p in qp.points() if p.scale != qp0.get(n, r).scale}
    assert moved == {True}  # weight scales moved, and nothing else did


def test_a_proposal_that_raises_fitness_is_undone():
    from clamp_export.quant.fakequant import Quantizer
    from clamp_export.search.evolution import try_proposal

    q = Quantizer(4, signed=True, symmetric=True)
    q.set_params(torch.tensor([0.1]), torch.zeros(1, dtype=torch.int32))

    def worse() -> None:
        q.set_params(torch.tensor([0.3]), torch.zeros(1, dtype=torch.int32))

    def fit() -> float:
        return abs(float(q.scale) - 0.1)

    assert try_proposal([q], fit, worse, 0.0) == 0.0 and float(q.scale) == pytest.approx(0.1)
    better = try_proposal([q], lambda: -1.0, worse, 0.0)
    assert better == -1.0 and float(q.scale) == pytest.approx(0.3)


def test_scan_round_trips_through_json():
    cfg = SearchConfig(scan=(0.5, 0.9), channel_scan=(0.7,))
    assert SearchConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("every, per_layer", [(0, 2), (4, 1), (1, 4)])
def test_image_refreshes_come_every_refresh_every_cycles(every, per_layer):
    _, qm, _, _, log = _search(
        cycles=4, passes=1, cyclic=True, refresh_steps=1, refresh_every=every
    )
    assert log.refreshes == per_layer * len(driver.stages.searchable_layers(qm))


def test_refresh_every_round_trips_and_stored_configs_keep_c_over_2():
    cfg = SearchConfig(refresh_every=4)
    assert SearchConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = SearchConfig(cycles=6).to_dict()  # what a search stored before the field existed
    assert "refresh_every" not in old and SearchConfig.from_dict(old).refresh_period() == 3
    assert preset("default").refresh_period() == preset("default").cycles == 4
    assert preset("default").passes == 2 and preset("paper").refresh_period() == 3
    thorough = preset("thorough")  # the previous default, as its stored searches recorded it
    assert thorough.passes == 3 and thorough.refresh_period() == 2
    assert "refresh_every" not in thorough.to_dict()
    with pytest.raises(UserError, match="refresh_every must be >= 0"):
        SearchConfig(refresh_every=-1)


def test_refinement_gradient_in_two_passes_is_exact():
    from clamp_export.search.driver import refinement_grad
    from clamp_export.synth.generator import float_tap
    from clamp_export.synth.losses import patch_infonce

    torch.manual_seed(0)
    model = make_tiny()
    x0 = noise_images(4, PRE)
    qm = calibrate(wrap_model(model, BitsSpec.parse("w4a4"), get_profile("ort")), x0)
    for p in qm.parameters():
        p.requires_grad_(False)
    tap = float_tap(model, "tiny")
    try:
        joint = x0.clone().requires_grad_(True)
        fp, feats = tap(joint)
        l_patch = torch.stack([patch_infonce(f, tap.grid)[0] for f in feats]).mean()
        (l_patch - 0.5 * (fp - qm(joint)).abs().mean()).backward()
        split = x0.clone().requires_grad_(True)
        refinement_grad(tap, qm, split, 0.5)
    finally:
        tap.close()
    assert joint.grad.abs().max() > 0
    torch.testing.assert_close(split.grad, joint.grad, rtol=1e-4, atol=1e-7)


def test_weight_cache_follows_swapped_parameter_data():
    """.to() / .cuda() replace a parameter's data without bumping its version: the search's
    fake-quant weight cache must notice (it fed CPU weights to a CUDA conv before)."""
    x = noise_images(4, PRE)
    qm = calibrate(wrap_model(make_tiny(), BitsSpec.parse("w8a8"), get_profile("ort")), x)
    with torch.no_grad():
        before = qm(x)  # fills the caches
        for mod in qm.modules():
            if hasattr(mod, "weight_q"):
                mod.weight.data = mod.weight.data * 0.5
        swapped = qm(x)
        for mod in qm.modules():
            if hasattr(mod, "weight_q"):
                mod.weight_q._cached_weight = None
        assert torch.equal(swapped, qm(x)) and not torch.equal(swapped, before)


def test_block_feature_term_in_the_refinement_lowers_the_block_error_it_measures():
    kw = dict(target="trt", refine_steps=15, refine_lr=0.01, refine_shift=0.15)
    assert "features_before" not in _search(**kw)[-1].refine  # logits only: no feature record
    *_, logits = _search(**kw, refine_features=1e-9)  # the logit KL alone, its features recorded
    *_, matched = _search(**kw, refine_features=1000.0)  # the tiny model's block error is ~3e-4
    rec, ref = matched.refine, logits.refine
    assert rec["features_before"] == ref["features_before"]  # the same searched model going in
    # the logit KL alone lets block errors grow where they cancel at the logits (0.22 -> 0.26e-3)
    assert rec["features_after"] < 0.8 * min(rec["features_before"], ref["features_after"])
    assert rec["kl_after"] < rec["kl_before"]


def test_feature_loss_is_relative_per_block():
    f = [torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 4)]
    assert float(feature_loss(f, f)) == 0.0
    assert float(feature_loss([torch.zeros(2, 3, 4)] * 2, f)) == pytest.approx(1.0)
    assert float(feature_loss([2 * x for x in f], f)) == pytest.approx(1.0)


def test_logprob_mse_counts_every_class_alike():
    fp = torch.tensor([[0.9, 0.09, 0.01]])
    assert float(logprob_mse(fp.log(), fp)) == pytest.approx(0.0, abs=1e-12)
    # a logit shift common to all classes is no error: log-probabilities are compared
    assert float(logprob_mse(fp.log() + 3.0, fp)) == pytest.approx(0.0, abs=1e-10)
    # the same factor of 2 on the least likely class instead of the likeliest: KL sees 0.17 of
    # the error, the log-probability MSE 0.56
    top = torch.tensor([[0.9 * 2, 0.09, 0.01]]).log()
    tail = torch.tensor([[0.9, 0.09, 0.01 * 2]]).log()

    def tail_share(kind: str) -> float:
        return float(distillation_loss(tail, fp, kind) / distillation_loss(top, fp, kind))

    assert tail_share("logprob_mse") > 3 * tail_share("kl")
    # by hand: log q - log p for logits log([1, 1]) against p = [0.75, 0.25]
    p = torch.tensor([[0.75, 0.25]])
    expected = math.log(0.5 / 0.75) ** 2 + math.log(0.5 / 0.25) ** 2
    assert float(logprob_mse(torch.zeros(1, 2), p)) == pytest.approx(expected)
    assert math.isfinite(float(logprob_mse(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))))
    assert tuple(DISTILLATION_LOSSES) == REFINE_LOSSES  # every name the config accepts runs


def test_refinement_on_logprob_mse_changes_scales_and_round_trips():
    kw = dict(target="trt", refine_steps=15, refine_lr=0.01, refine_shift=0.15)
    _, _, kl, _, _ = _search(**kw)
    _, qm, mse, _, log = _search(**kw, refine_loss="logprob_mse")
    assert log.refine["kl_after"] < log.refine["kl_before"]  # it still pulls Q towards FP
    assert [p.scale for *_, p in mse.points()] != [p.scale for *_, p in kl.points()]
    cfg = SearchConfig(refine_steps=5, refine_loss="logprob_mse")
    assert SearchConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert "refine_loss" not in SearchConfig(refine_steps=5).to_dict()  # stored cells keep keys
    with pytest.raises(
        UserError, match="unknown refine_loss 'mse'; choose one of: kl, logprob_mse"
    ):
        SearchConfig(refine_loss="mse")
