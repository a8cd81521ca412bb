"""report.html in a real browser (Debian's headless Chromium): every picture loads, the console
stays clean, nothing is fetched from the network, and the verdict comes first."""

import json
import re

import pytest

from tests.browser import CHROMEDRIVER, CHROMIUM, open_page
from tests.conftest import requires_fmnist
from tests.unit.test_cli_errors import run_cli

pytestmark = [
    pytest.mark.e2e,
    requires_fmnist,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER), reason="chromium/chromedriver not installed"
    ),
]


def test_report_html_in_headless_chromium(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "fmnist_vit",
        "--bits",
        "w8a8",
        "--target",
        "ort",
        "--calib",
        "clamp-synth",
        "--synth-preset",
        "fast",
        "--eval-data",
        "fmnist",
        "--eval-limit",
        "1000",
        "--min-agreement",
        "0.99",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']https?:""", page)  # self-contained: no network
    assert page.index("PASS: all") < page.index("accuracy and parity") < page.index("<img")
    seen = open_page(out / "report.html", tmp_path / "report.png")
    titles = [alt for alt, _, _ in seen["images"]]
    assert titles == [
        "Latency and throughput against batch size",
        "Logit error against the fake-quant model",
        "Per-block error",
        "Confusion matrix",
        "Stage 1 images",
    ]
    assert all(done and width > 0 for _, done, width in seen["images"]), seen["images"]
    assert seen["console"] == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert "report.html" in json.loads((out / "manifest.json").read_text())["files"]
