"""The accuracy benchmarks' shared search gives the model a full search would have given."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clamp_export.data.sources import noise_images
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.fakequant import collect_qparams
from clamp_export.search import SearchConfig
from tests.conftest import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import quantized_model, shared_search_path  # noqa: E402

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
CFG = dict(passes=1, cycles=2, population=4, equalize=True, refine_steps=5, refine_shift=0.15)


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_a_shared_search_gives_the_full_searchs_model_and_its_time(tmp_path, target):
    loaded = SimpleNamespace(name="tiny", model=make_tiny(), preprocess=PRE)
    calib = noise_images(8, PRE, seed=0)
    header = {"model": "tiny", "target": target, "bits": "w4a4"}

    def qparams(cfg, shared=None):
        qm, reused = quantized_model(loaded, "w4a4", target, calib, "minmax", cfg, shared=shared)
        return collect_qparams(qm, **header).to_dict(), reused

    full, _ = qparams(SearchConfig(**CFG))
    shared = tmp_path / "search.json"
    first, reused_first = qparams(SearchConfig(**CFG), shared)
    again, reused_again = qparams(SearchConfig(**CFG), shared)
    assert first == full == again and shared.is_file()
    assert reused_first == 0.0 < reused_again  # the reuse is credited with the search's time
    other, _ = qparams(SearchConfig(**{**CFG, "refine_steps": 2}), shared)
    assert other != full  # the refinement still runs on the shared search


def test_cells_share_a_search_when_only_their_refinement_differs():
    def key(**search):
        return {"model": "m", "seed": 0, "search": SearchConfig(**search).to_dict()}

    base = shared_search_path(key(refine_steps=300, refine_shift=0.07))
    assert base == shared_search_path(key(refine_steps=100))
    assert base == shared_search_path(key(refine_steps=300, refine_features=1.0))
    assert base == shared_search_path(key())
    assert base != shared_search_path(key(cyclic=False))
    assert base != shared_search_path({**key(), "seed": 1})
