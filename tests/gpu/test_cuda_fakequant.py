"""Fake-quant on CUDA computes what it computes on the CPU (runs where a GPU exists)."""

import pytest
import torch

from clamp_export.data.sources import noise_images
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_cuda_matches_cpu(tiny_vit):
    pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
    qm = calibrate(
        wrap_model(tiny_vit, BitsSpec.parse("w4a4"), get_profile("trt")), noise_images(8, pre)
    )
    x = noise_images(16, pre, seed=1)
    with torch.no_grad():
        cpu = qm(x)
        gpu = qm.cuda()(x.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-3
    assert torch.equal(cpu.argmax(1), gpu.argmax(1))
