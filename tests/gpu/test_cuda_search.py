"""Stage 1 and Stage 2 run on the GPU when the model is there (runs where a GPU exists)."""

import json

import pytest
import torch

from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import wrap_model
from clamp_export.quant.targets import get_profile
from clamp_export.search import SearchConfig, driver, run_search
from clamp_export.synth import preset as synth_preset
from clamp_export.synth.generator import generate
from tests.conftest import make_tiny
from tests.unit.test_cli_errors import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
HEADER = {"model": "tiny", "target": "trt", "bits": "w4a4"}


def test_synthesis_search_and_resume_on_cuda(tmp_path):
    model = make_tiny().cuda()
    synth = generate(model, PRE, synth_preset("fast", n=8, steps=5), progress=False)
    assert synth.images.device.type == "cpu" and len(synth.loss_curve) == 5  # as when cached
    x = synth.images.cuda()
    qm = calibrate(wrap_model(model, BitsSpec.parse("w4a4"), get_profile("trt")), x)
    cfg = SearchConfig(passes=2, cycles=2, population=4)  # cyclic: image refinement on CUDA too
    start = driver.model_evaluator(cfg, model, qm, x)()
    layers = 2 * len(driver.stages.searchable_layers(qm))

    def search(**kw):
        return run_search(
            model,
            qm,
            x,
            cfg,
            HEADER,
            PRE.pixel_bounds(),
            run_dir=tmp_path,
            progress=False,
            **kw,
        )

    search(stop_after=3)  # a kill after three layers, then a resume from the checkpoint
    qp, images, log = search(resume=True)
    assert images.is_cuda and len(log.layers) == layers and len(log.passes) == 2
    assert all(z == 0 for _, _, p in qp.points() for z in p.zero_point)
    assert driver.model_evaluator(cfg, model, qm, x)() < start


@pytest.mark.parametrize("bits", ["w4a8", "mp:5"])
def test_cli_searches_on_cuda(tiny_weights, tmp_path, bits):
    _, args = tiny_weights
    out = tmp_path / "o"
    proc = run_cli(
        *args,
        "--bits",
        bits,
        "--device",
        "cuda",
        "--synth-preset",
        "fast",
        "--search-preset",
        "fast",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backends"]["ort-qdq"]["agreement"] >= 0.995
    assert json.loads((out / "search.json").read_text())["passes"][0]["fitness"] > 0


def test_synth_cli_on_cuda(tiny_weights, tmp_path):
    _, args = tiny_weights
    out = tmp_path / "s"
    proc = run_cli(
        "synth",
        *args,
        "--n",
        "4",
        "--steps",
        "5",
        "--device",
        "cuda",
        "--no-cache",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images.safetensors", "synth.json"]
