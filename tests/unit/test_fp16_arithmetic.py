"""The `trt` fake-quant model computes what its FP16 graph computes, rounding for rounding."""

import onnx
import pytest
import torch
from torch import nn

from clamp_export.data.sources import noise_images
from clamp_export.export.qdq import export_qdq
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.fp16 import GraphGELU, to_fp16_grid, to_fp16_grid_
from clamp_export.quant.math import integer_product
from clamp_export.quant.targets import get_profile
from clamp_export.runtime.fp16_rounding import explicit_fp16
from clamp_export.runtime.runners import OrtRunner, TorchRunner
from tests.conftest import make_tiny

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))


def _trt_graph(model, bits, tmp_path, softmax="uniform"):
    profile = get_profile("trt")
    qm = wrap_model(model, BitsSpec.parse(bits), profile, softmax)
    qm = calibrate(qm, noise_images(16, PRE, 0))
    path = tmp_path / f"{bits}-{softmax}.onnx"
    return qm, export_qdq(qm, PRE.input_size, profile, path), path


REG4 = {"reg_tokens": 4}  # 5 prefix tokens, heads of 16 dims: attention scale 1/4
HEAD32 = {"num_heads": 1}  # one head of 32 dims: 1/sqrt(32) is 0.17676 in FP16, not 0.17678


@pytest.mark.parametrize(
    "bits,softmax,shape",
    [
        ("w8a8", "uniform", REG4),
        ("w4a8", "uniform", REG4),
        ("w4a4", "uniform", REG4),
        ("w4a4", "twin", REG4),
        ("w8a8", "uniform", HEAD32),
        ("w4a4", "uniform", HEAD32),
    ],
)
def test_trt_fake_quant_equals_its_fp16_graph(tmp_path, bits, softmax, shape):
    """Every logit, bit for bit. Rounding only the Q inputs left 2% of the logits identical at
    W8A8 and 0% at W4A4; rounding every stored tensor but summing the matmuls in float left 99.2%
    at W8A8 (summation order); integer kernels on both sides leave none different, once the
    attention scale is the graph's FP16 constant too."""
    model = make_tiny(**shape)
    with torch.no_grad():  # peaked attention, or the softmax hides what q @ kᵀ gets wrong
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8)
    qm, _, path = _trt_graph(model, bits, tmp_path, softmax)
    x = noise_images(128, PRE, seed=7)
    assert torch.equal(OrtRunner(path)(x), TorchRunner(qm, "fq")(x))


def test_explicit_rounding_copy_keeps_the_interface_and_rounds_each_result(tiny_vit, tmp_path):
    _, proto, _ = _trt_graph(tiny_vit, "w4a4", tmp_path)
    assert not any(n.op_type == "Cast" for n in proto.graph.node)  # emulation writes no node
    x = explicit_fp16(proto)
    onnx.checker.check_model(x, full_check=True)
    f16 = onnx.TensorProto.FLOAT16
    assert x.graph.input[0].type.tensor_type.elem_type == f16
    assert x.graph.output[0].type.tensor_type.elem_type == f16
    assert not any(i.data_type == f16 for i in x.graph.initializer)
    producer = {o: n for n in x.graph.node for o in n.output}
    down = [n for n in x.graph.node if n.op_type == "Cast" and n.attribute[0].i == f16]
    rounded = {producer[n.input[0]].op_type for n in down if n.input[0] in producer}
    ops = {n.op_type for n in x.graph.node}
    # every matmul and the conv run on integers, and their dequantized inputs are gone
    assert {"MatMulInteger", "ConvInteger"} <= ops
    assert not ops & {"MatMul", "Conv", "DequantizeLinear"}
    # every arithmetic op rounds its result (the integer kernels' after their scale and bias)
    assert {
        "Add",
        "Mul",
        "Div",
        "Erf",
        "Softmax",
        "LayerNormalization",
    } <= rounded
    assert not rounded & {"MatMulInteger", "ConvInteger", "Reshape"}
    up = [n for n in x.graph.node if n.op_type == "Cast" and n.attribute[0].i != f16]
    kernels = [n for n in x.graph.node if n.op_type in {"MatMulInteger", "ConvInteger"}]
    accumulators = [n for n in up if n.input[0] in {k.output[0] for k in kernels}]
    assert len(accumulators) == len(kernels)  # int32 -> FP32 once per kernel, not rounded
    # each rounding a down-and-up pair; the input up, the output down
    assert len(up) - len(accumulators) == len(down)


def test_graph_gelu_rounds_each_op_of_the_decomposition():
    x = torch.linspace(-6, 6, 20001)
    g = GraphGELU()(x)
    assert torch.equal(g, g.half().float())
    # one rounding of the exact GELU is a different function: the decomposition's steps show
    assert not torch.equal(g, nn.functional.gelu(x).half().float())
    assert (g - nn.functional.gelu(x)).abs().max() < 1e-2
    assert torch.equal(GraphGELU()(x.half()), nn.functional.gelu(x.half()))  # traced as is


def test_in_place_rounding_only_where_autograd_does_not_record_it():
    x = torch.linspace(-3, 3, 1001) / 7
    ref = to_fp16_grid(x)
    assert not torch.equal(ref, x)
    y = x.clone()
    assert to_fp16_grid_(y) is y and torch.equal(y, ref)  # no grad: its own storage
    w = x.clone().requires_grad_()
    z = to_fp16_grid_(w * 1.0)  # recorded: a new tensor, and backward still runs
    assert torch.equal(z, ref)
    z.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(x))


def test_trt_fake_quant_leaves_its_input_and_search_images_alone(tiny_vit):
    """Products and sums are rounded in place; the images a search reuses must not be."""
    qm = calibrate(
        wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("trt")), noise_images(4, PRE, 1)
    )
    x = noise_images(4, PRE, 0) / 3  # off the FP16 grid
    x0 = x.clone()
    with torch.inference_mode():
        first, second = qm(x), qm(x)
    assert torch.equal(x, x0)
    assert torch.equal(first, second)


def test_ort_profile_keeps_fp32_arithmetic(tiny_vit, tmp_path):
    qm = wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("ort"))
    assert type(qm.blocks[0]).__name__ == "Block"
    assert type(qm.blocks[0].mlp.act) is nn.GELU
    qt = wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("trt"))
    assert type(qt.blocks[0]).__name__ == "FP16Block"
    assert isinstance(qt.blocks[0], type(qm.blocks[0]))  # the equalization's layout check holds
    assert qt.state_dict().keys() == qm.state_dict().keys()  # qparams and weights by the same names


@pytest.mark.parametrize("k,exact_in", [(64, "fp32"), (2048, "fp64")])
def test_integer_product_sums_levels_exactly(k, exact_in):
    """8-bit levels: K=64 keeps every partial sum below 2^24 in FP32; K=2048 can pass it, and the
    sum then runs in FP64. Either way the result is the int32 sum converted once, scaled once."""
    g = torch.Generator().manual_seed(0)
    la = torch.randint(-128, 128, (16, k), generator=g).float()
    lb = torch.randint(-128, 128, (k, 8), generator=g).float()
    scale = torch.tensor(0.0123).half().float() * torch.rand(8, generator=g).half().float()
    bound = 128 * 128 * k
    assert (bound < 2**24) == (exact_in == "fp32")
    exact = (la.long() @ lb.long()).float() * scale
    assert torch.equal(integer_product(torch.matmul, la, lb, scale, bound), exact)
    if exact_in == "fp64":  # what a float sum of such levels gets wrong
        big = torch.full((1, k), 127.0) @ torch.full((k, 1), 127.0 + 1 / 64)
        assert big.item() != 127 * (127 + 1 / 64) * k
