"""The lpbq-tvm command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from lpbq_tvm.cli import main


def test_demo_prints_every_layer(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for layer, op in (("conv", "Conv"), ("fc1", "Gemm"), ("fc2", "MatMul")):
        assert layer in out and op in out
    assert "128x64x3x3" in out and "4.069" in out


def test_bad_block_size_is_one_line_and_nonzero():
    result = subprocess.run([sys.executable, "-m", "lpbq_tvm", "demo", "--block-size", "48"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not divisible by block_size 48" in result.stderr and "Traceback" not in result.stderr
