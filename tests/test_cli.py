"""The lpbq-tvm command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from lpbq_tvm.cli import main


def test_demo_quantizes_compiles_and_reports(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for layer, op in (("conv", "Conv"), ("fc1", "Gemm"), ("fc2", "MatMul")):
        assert layer in out and op in out
    assert "128x64x3x3" in out and "4.069" in out and out.count("LPBQ B64") == 3
    assert "7.7x smaller" in out  # 491,520 fp32 weight bytes vs 63,744 packed


def test_demo_reports_layers_that_cannot_take_the_block_size(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["demo", "--block-size", "96"]) == 0
    out = capsys.readouterr().out
    assert out.count("not divisible by") == 3 and "LPBQ B96" not in out


def test_bad_option_is_one_line_and_nonzero():
    result = subprocess.run(
        [sys.executable, "-m", "lpbq_tvm", "demo", "--block-size", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "lpbq-tvm demo: error: block_size must be positive, got 0"
