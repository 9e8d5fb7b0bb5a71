"""The quantization report: contents, and that a real headless browser renders it with its plots."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from system_tools import missing_tool

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.report import build_report, write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=["MatMul"], excluded_nodes=["fc2"])
    batches = [{"x": np.random.default_rng(s).standard_normal((1, 64, 8, 8)).astype(np.float32)} for s in range(3)]
    sim.compute_encodings(lambda s, data: [s.run(b) for b in data], batches)
    report = build_report(sim, batches, ("weight-only", "w4a8"), name="example")
    return report, write_report(report, tmp_path_factory.mktemp("r") / "report")


def test_report_contents(report_dir):
    report, directory = report_dir
    assert sorted(p.name for p in directory.iterdir()) == [
        "index.html",
        "k_histogram.png",
        "report.md",
        "sizes.png",
        "sqnr.png",
    ]
    assert report.fp32_bytes == 4 * (128 * 64 * 9 + 256 * 128 + 256 * 64)
    assert report.quantized_share == pytest.approx((128 * 64 * 9 + 256 * 128) / (128 * 64 * 9 + 256 * 128 + 256 * 64))
    assert [a.mode for a in report.agreements] == ["weight-only", "w4a8"]
    assert all(0.95 < a.cosine <= 1.0 for a in report.agreements)
    markdown = (directory / "report.md").read_text()
    assert "| fc2 | MatMul | 256×64 | fp32: excluded by the user |" in markdown and "![sqnr.png](sqnr.png)" in markdown


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    _, directory = report_dir
    chromium = shutil.which("chromium")
    if chromium is None:
        missing_tool("needs Chromium, which pip cannot install: apt-get install chromium (Debian / Ubuntu)")
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--dump-dom", (directory / "index.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert "<h1>LPBQ report: example</h1>" in dom and dom.count("<tr>") == 4  # header + 3 layers
    assert len(re.findall(r'<img alt="[a-z_]+\.png" src="data:image/png;base64,', dom)) == 3
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [*common, "--window-size=1000,1600", f"--screenshot={screenshot}", (directory / "index.html").as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]
    blue = np.all(np.abs(pixels - np.array([0x2A, 0x7A, 0xB9]) / 255) < 0.05, axis=-1)
    assert blue.sum() > 5000  # the plots' bars were drawn (the images decoded and were laid out)
