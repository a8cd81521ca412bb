import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from clamp_export.quant.math import (
    dequantize,
    fake_quantize,
    fake_quantize_learned,
    level_range,
    params_from_range,
    quantize,
)


def _onnx_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 1) -> np.ndarray:
    """ONNX Runtime's own QuantizeLinear: the reference the exported graph runs."""
    ztype = TensorProto.INT8 if zp.dtype == np.int8 else TensorProto.UINT8
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", ztype, list(x.shape))],
        [
            helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.ravel().tolist()),
            helper.make_tensor("z", ztype, list(zp.shape), zp.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_level_ranges():
    assert level_range(8, True) == (-128, 127)
    assert level_range(4, True) == (-8, 7)
    assert level_range(8, False) == (0, 255)
    assert level_range(2, False) == (0, 3)
    with pytest.raises(ValueError):
        level_range(9, True)


def test_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    q = quantize(x, torch.tensor([1.0]), torch.tensor([0]), -128, 127)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0]


def test_matches_onnx_quantizelinear_per_tensor_with_ties_and_saturation():
    rng = np.random.default_rng(0)
    scale = np.array(0.05, dtype=np.float32)
    # exact ties (k + 0.5) * scale, plus values far out of range
    ties = ((np.arange(-20, 20) + 0.5) * 0.05).astype(np.float32)
    x = np.concatenate([rng.normal(0, 3, 500).astype(np.float32), ties, [100.0, -100.0]]).astype(
        np.float32
    )
    for zp, qmin, qmax in [(np.int8(0), -128, 127), (np.uint8(37), 0, 255)]:
        ref = _onnx_quantize(x, scale, np.array(zp))
        ours = quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(int(zp)), qmin, qmax)
        np.testing.assert_array_equal(ours.numpy().astype(ref.dtype), ref)


def test_matches_onnx_quantizelinear_per_channel():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (4, 6)).astype(np.float32)
    scale = np.array([0.01, 0.02, 0.5, 0.003], dtype=np.float32)
    ref = _onnx_quantize(x, scale, np.zeros(4, dtype=np.int8), axis=0)
    ours = quantize(torch.from_numpy(x), torch.from_numpy(scale), torch.zeros(4), -128, 127, axis=0)
    np.testing.assert_array_equal(ours.numpy().astype(np.int8), ref)


def test_dequantize_and_fake_quant_agree():
    x = torch.randn(3, 5)
    s, z = torch.tensor([0.1]), torch.tensor([3])
    expected = dequantize(quantize(x, s, z, 0, 15), s, z)
    assert torch.equal(fake_quantize(x, s, z, 0, 15), expected)
    # values land on the grid and within the levels
    levels = (expected / 0.1 + 3).round()
    assert levels.min() >= 0 and levels.max() <= 15


def test_fake_quant_fast_paths_match_the_reference_math():
    """The in-place no-grad path and zero_point=None equal quantize -> dequantize bit for bit."""
    x = torch.randn(4, 7, 6) * 3
    s = torch.tensor([0.05, 0.2, 0.013, 0.4, 0.07, 0.11])
    z = torch.tensor([0, 3, -2, 7, 0, -8], dtype=torch.int32)
    for zp in (z, torch.zeros(6, dtype=torch.int32)):
        expected = dequantize(quantize(x, s, zp, -8, 7, axis=-1), s, zp, axis=-1)
        assert torch.equal(fake_quantize(x, s, zp, -8, 7, axis=-1), expected)
        with torch.enable_grad():  # the autograd path agrees too
            y = fake_quantize(x.clone().requires_grad_(True), s, zp, -8, 7, axis=-1)
        assert torch.equal(y.detach(), expected)
    zero = dequantize(quantize(x, s, torch.zeros(6), -8, 7, axis=-1), s, torch.zeros(6), axis=-1)
    assert torch.equal(fake_quantize(x, s, None, -8, 7, axis=-1), zero)
    with torch.enable_grad():
        y = fake_quantize(x.clone().requires_grad_(True), s, None, -8, 7, axis=-1)
    assert torch.equal(y.detach(), zero)
    assert not torch.equal(zero, fake_quantize(x, s, z, -8, 7, axis=-1))  # z matters here


def test_fake_quant_straight_through_gradient():
    x = torch.randn(10, requires_grad=True)
    fake_quantize(x, torch.tensor([0.1]), torch.tensor([0]), -8, 7).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_learned_scale_fake_quant_matches_and_gives_the_lsq_gradient():
    x = torch.randn(4, 7, 6) * 3
    s = torch.tensor([0.05, 0.2, 0.013, 0.4, 0.07, 0.11])
    z = torch.tensor([0, 3, -2, 7, 0, -8], dtype=torch.int32)
    scale = s.clone().requires_grad_(True)
    y = fake_quantize_learned(x, scale, z, -8, 7, axis=-1)
    assert torch.equal(y.detach(), fake_quantize(x, s, z, -8, 7, axis=-1))  # same values
    # LSQ: d/ds = round(x/s) - x/s inside the levels, the saturated level (qmin or qmax) - z outside
    one = torch.tensor([0.26, 0.9, -5.0])
    step = torch.tensor([0.1], requires_grad=True)
    fake_quantize_learned(one, step, torch.tensor([0]), -8, 7).sum().backward()
    expected = (3 - 2.6) + (7 - 0) + (-8 - 0)
    assert step.grad.item() == pytest.approx(expected, abs=1e-5)


def test_params_from_range_symmetric_and_asymmetric():
    s, z = params_from_range(torch.tensor([-2.0]), torch.tensor([1.0]), -128, 127, symmetric=True)
    assert torch.allclose(s, torch.tensor([2.0 / 127])) and int(z) == 0
    s, z = params_from_range(torch.tensor([0.5]), torch.tensor([2.0]), 0, 255, symmetric=False)
    # range widened to include 0 so that 0 is exact
    assert torch.allclose(s, torch.tensor([2.0 / 255])) and int(z) == 0
    s, z = params_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 15, symmetric=False)
    assert torch.allclose(s, torch.tensor([4.0 / 15]))
    zero = dequantize(quantize(torch.tensor([0.0]), s, z, 0, 15), s, z)
    assert float(zero) == 0.0
