import json

import pytest
import torch

from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import collect_qparams, load_qparams, wrap_model
from clamp_export.quant.qparams import QParams, QuantPoint
from clamp_export.quant.targets import get_profile
from clamp_export.search.evolution import layer_quantizers

PRE = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 16, 16))


@pytest.mark.parametrize(
    "text,w,a", [("w8a8", 8, 8), ("W4A8", 4, 8), ("w3a4", 3, 4), ("w2a2", 2, 2)]
)
def test_bits_parse(text, w, a):
    b = BitsSpec.parse(text)
    assert (b.weight, b.act, b.edge) == (w, a, 8)


@pytest.mark.parametrize("text", ["w9a8", "w4", "a8w8", "w1a8", "int8", ""])
def test_bits_malformed(text):
    with pytest.raises(UserError, match="malformed --bits"):
        BitsSpec.parse(text)


def _calibrated(tiny_vit, target: str, bits: str = "w4a8", softmax: str = "uniform") -> tuple:
    profile = get_profile(target)
    qm = calibrate(
        wrap_model(tiny_vit, BitsSpec.parse(bits), profile, softmax), noise_images(8, PRE)
    )
    return qm, collect_qparams(qm, model="tiny", target=target, bits=bits, metadata={"seed": 0})


@pytest.mark.parametrize(
    "target,bits,softmax",
    [("ort", "w4a8", "uniform"), ("trt", "w4a4", "uniform"), ("ort", "w4a4", "twin")],
)
def test_qparams_json_round_trip(tiny_vit, tmp_path, target, bits, softmax):
    qm, qp = _calibrated(tiny_vit, target, bits, softmax)
    path = tmp_path / "qparams.json"
    qp.save(path)
    back = QParams.load(path)
    assert back.to_dict() == qp.to_dict()
    raw = json.loads(path.read_text())
    assert raw["version"] == 5
    assert raw["modules"]["blocks.0.attn"]["attn"].get("twin", False) == (softmax == "twin")
    assert "twin" not in raw["modules"]["blocks.0.attn"]["q"]  # written only where it is on
    assert set(raw["modules"]["blocks.0.attn"]) == {"q", "k", "attn", "v"}
    assert set(raw["modules"]["blocks.1.mlp.fc2"]) == {"input", "weight"}
    w = back.get("blocks.0.attn.qkv", "weight")
    assert (w.bits, w.signed, w.axis, len(w.scale)) == (4, True, 0, 96)
    # loading into a fresh wrapper reproduces the same fake-quant model
    fresh = load_qparams(wrap_model(tiny_vit, BitsSpec.parse(bits), get_profile(target)), back)
    x = noise_images(4, PRE, seed=5)
    assert (fresh(x) - qm(x)).abs().max() == 0


def test_profiles_shape_the_parameters(tiny_vit):
    _, trt = _calibrated(tiny_vit, "trt")
    assert all(z == 0 for _, _, p in trt.points() for z in p.zero_point)
    assert all(p.signed for _, _, p in trt.points())
    _, ortqp = _calibrated(tiny_vit, "ort")
    acts = [p for _, r, p in ortqp.points() if r != "weight"]
    assert all(not p.signed for p in acts)
    assert any(p.zero_point[0] != 0 for p in acts)  # asymmetric ranges used where they help
    # softmax output needs no data: [0, 1] on 8 levels-worth of uint8
    assert ortqp.get("blocks.0.attn", "attn").scale == pytest.approx([1 / 255])
    # trt stores FP16 scales: exactly the FP16 value of 1/127
    assert trt.get("blocks.0.attn", "attn").scale == [float(torch.tensor(1 / 127).half())]


def test_validation_rejects_nonzero_zero_point_for_trt(tiny_vit):
    _, qp = _calibrated(tiny_vit, "trt")
    qp.get("blocks.0.mlp.fc1", "input").zero_point = [3]
    with pytest.raises(UserError, match=r"blocks.0.mlp.fc1:input: zero-point 3 .* symmetric"):
        qp.validate(get_profile("trt"))


def test_validation_rejects_ort_params_on_trt_and_per_tensor_weights(tiny_vit):
    _, qp = _calibrated(tiny_vit, "ort")
    bad = qp.violations(get_profile("trt"))
    assert any("needs int8 levels" in v for v in bad)
    qp.set("head", "weight", QuantPoint(8, True, [0.1], [0], axis=None))
    assert any(
        "head:weight: weights must be per-output-channel" in v
        for v in qp.violations(get_profile("ort"))
    )


def test_trt_sub8_bit_activations_slide_their_window(tiny_vit):
    _, qp = _calibrated(tiny_vit, "trt", "w4a4")
    assert qp.violations(get_profile("trt")) == []
    assert all(z == 0 for _, _, p in qp.points() for z in p.zero_point)  # TensorRT: zero-point 0
    acts = {(m, r): p for m, r, p in qp.points() if r != "weight" and p.bits == 4}
    assert acts and all(p.window[1] - p.window[0] == 15 for p in acts.values())
    # the softmax output's [0, 1] takes all 16 levels, not the 8 of a centred [-8, 7]
    soft = qp.get("blocks.0.attn", "attn")
    assert soft.window == [0, 15]
    assert soft.scale == [float(torch.tensor(1 / 15).half())]
    assert any(p.window != [-8, 7] for p in acts.values())
    # 8-bit points fill the int8 container: nothing to slide
    assert qp.get("head", "input").window is None
    assert qp.get("blocks.0.mlp.fc1", "weight").window is None


@pytest.mark.parametrize(
    "target,point,window,message",
    [
        ("trt", ("blocks.0.mlp.fc1", "input"), [-3, 11], "must span exactly 16 levels"),
        ("trt", ("blocks.0.mlp.fc1", "input"), [1, 16], "must hold level 0"),
        ("trt", ("head", "input"), [-100, 155], "only for activations below 8 bits"),
        ("trt", ("blocks.0.mlp.fc1", "weight"), [-8, 7], "only for activations below 8 bits"),
        ("ort", ("blocks.0.mlp.fc1", "input"), [0, 15], "only for activations below 8 bits"),
    ],
)
def test_validation_rejects_bad_windows(tiny_vit, target, point, window, message):
    _, qp = _calibrated(tiny_vit, target, "w4a4")
    qp.get(*point).window = window
    assert any(message in v for v in qp.violations(get_profile(target)))


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_twin_softmax_levels_cover_0_to_1_in_two_steps(tiny_vit, target):
    qm, qp = _calibrated(tiny_vit, target, "w4a4", "twin")
    soft = qp.get("blocks.0.attn", "attn")
    assert soft.twin and soft.zero_point == [0] and soft.window is None
    assert soft.scale[0] == pytest.approx(1 / 56, rel=1e-3)  # coarse step 8/56 = 1/7: 7/7 = 1
    assert qp.violations(get_profile(target)) == []
    q = qm.blocks[0].attn.attn
    p = torch.tensor([0.0, 0.01, 0.05, 0.124, 0.14, 0.2, 0.55, 0.99, 1.0])
    fine, coarse = q.parts(p)
    s = soft.scale[0]
    assert torch.allclose(fine, torch.tensor([0, 1, 3, 7, 0, 0, 0, 0, 0]) * s)
    assert torch.allclose(coarse, torch.tensor([0, 0, 0, 0, 1, 1, 4, 7, 7]) * 8 * s)
    # every value lands in exactly one part: 15 distinct values, 0 included (within 4 bits)
    parts = q.parts(torch.linspace(0, 1, 2001))
    assert ((parts[0] != 0) & (parts[1] != 0)).sum() == 0
    assert len({round(float(v), 6) for v in torch.cat(parts)}) == 15
    # the search leaves the data-free levels alone; the model refuses a one-term call
    assert q not in layer_quantizers(qm.blocks[0].attn)
    with pytest.raises(RuntimeError, match="call parts"):
        q(p)


@pytest.mark.parametrize("point", [("blocks.0.attn", "q"), ("blocks.0.mlp.fc1", "weight")])
def test_validation_rejects_twin_where_it_cannot_run(tiny_vit, point):
    _, qp = _calibrated(tiny_vit, "trt", "w4a4")
    qp.get(*point).twin = True
    assert any("twin-uniform levels are only" in v for v in qp.violations(get_profile("trt")))


def test_version_1_files_read_as_centred_levels(tiny_vit):
    """A qparams.json written before windows existed means the symmetric [-8, 7] levels."""
    qm, qp = _calibrated(tiny_vit, "trt", "w4a4")
    old = qp.to_dict()
    old["version"] = 1
    for roles in old["modules"].values():
        for point in roles.values():
            point.pop("window", None)
    back = QParams.from_dict(old)
    fresh = load_qparams(wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("trt")), back)
    assert fresh.blocks[0].attn.attn.graph_levels() == (0, -8, 7)
    assert back.violations(get_profile("trt")) == []


def test_unknown_schema_version(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"version": 99, "modules": {}}))
    with pytest.raises(UserError, match="schema version 99"):
        QParams.load(path)


def test_qparams_for_another_model_is_refused(tiny_vit):
    _, qp = _calibrated(tiny_vit, "ort")
    del qp.modules["head"]
    with pytest.raises(UserError, match="does not match this model"):
        load_qparams(wrap_model(tiny_vit, BitsSpec.parse("w4a8"), get_profile("ort")), qp)
