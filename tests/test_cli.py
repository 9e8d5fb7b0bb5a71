"""The lpbq-tvm command line, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import onnx

from lpbq_tvm.cli import main


def test_demo_quantizes_compiles_and_reports(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for layer, op in (("conv", "Conv"), ("fc1", "Gemm"), ("fc2", "MatMul")):
        assert layer in out and op in out
    assert "128×64×3×3" in out and "4.069" in out and out.count("LPBQ B64") == 3
    # 491,520 fp32 weight bytes vs 64,256 in the kernels' tiled layouts: 63,744 packed + 512 for the
    # conv's k, stored once per kernel tap for its tap-major im2col columns
    assert "7.6x smaller" in out


def test_demo_reports_layers_that_cannot_take_the_block_size(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["demo", "--block-size", "128"]) == 0  # conv has 64 input channels
    out = capsys.readouterr().out
    assert out.count("not divisible by block_size 128") == 1 and out.count("LPBQ B128") == 2
    assert main(["demo", "--block-size", "96"]) == 2
    assert "block_size 96 fits none of the 3 selected layers (input channels: 128, 256, 64)" in capsys.readouterr().err


def test_bad_option_is_one_line_and_nonzero():
    result = subprocess.run(
        [sys.executable, "-m", "lpbq_tvm", "demo", "--block-size", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "lpbq-tvm demo: error: block_size must be positive, got 0"


def _example_files(tmp_path):
    import numpy as np
    import onnx

    from lpbq_tvm.examples import build_example_model

    model = tmp_path / "example.onnx"
    onnx.save(build_example_model(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((3, 1, 64, 8, 8)).astype(np.float32))
    return model, calib


# A linked library and its CPU-feature probe, or objects without the cross linker (tests/test_compiler.py has both).
AARCH64_LIBRARY = ["cpu_features.so", "model.so"] if shutil.which("aarch64-linux-gnu-g++") else ["model.tar"]
AARCH64_BUNDLE = sorted(["manifest.json", "params.bin", *AARCH64_LIBRARY])


def test_compile_writes_an_aarch64_bundle(tmp_path, capsys):
    model, calib = _example_files(tmp_path)
    out = tmp_path / "bundle"
    args = ["compile", str(model), "--target", "aarch64", "--mode", "w4a8", "--calib", str(calib), "-o", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == AARCH64_BUNDLE
    assert "target aarch64, mode w4a8" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert main(args) == 3  # exists
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_failed_compile_leaves_no_output(tmp_path, capsys):
    model, calib = _example_files(tmp_path)
    out = tmp_path / "bundle"
    assert main(["compile", str(model), "--mode", "w4a16", "-o", str(out)]) == 2
    assert "give calibration data with --calib" in capsys.readouterr().err
    assert main(["compile", str(model), "--block-size", "96", "--strict", "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert "strict LPBQ: " in error and "is not divisible by block_size 96" in error
    assert main(["compile", str(tmp_path / "missing.onnx"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "example.onnx"]  # no bundle, no staging


def test_export_every_format(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per message
    model, calib = _example_files(tmp_path)
    cases = [
        (["--format", "aimet-json"], "model.encodings", "aimet-json 1.0.0"),
        (["--format", "aimet-json", "--encoding-version", "2.0.0"], "model2.encodings", "aimet-json 2.0.0"),
        (["--format", "ort-onnx"], "model.int4.onnx", "2 MatMulNBits"),
        (
            ["--format", "qnn-onnx", "--calib", str(calib), "--activation-bits", "16"],
            "model.qnn.onnx",
            "LSB vs htp-sim",
        ),
        (
            ["--format", "qnn-onnx", "--calib", str(calib), "--quantize-activations", "lpbq"],
            "lpbq.qnn.onnx",
            "LSB vs htp-sim",
        ),
        (["--format", "tvm", "--target", "aarch64"], "bundle", "target aarch64"),
    ]
    for options, name, expected in cases:
        assert main(["export", str(model), *options, "-o", str(tmp_path / name)]) == 0, name
        assert expected in capsys.readouterr().out
        assert (tmp_path / name).exists()
    quantizers = {
        name: sum(node.op_type == "QuantizeLinear" for node in onnx.load(tmp_path / name).graph.node)
        for name in ("model.qnn.onnx", "lpbq.qnn.onnx")
    }
    # the example's 8 float activations, or the inputs and outputs of its 3 layers; and fc1's product before its bias
    assert quantizers == {"model.qnn.onnx": 9, "lpbq.qnn.onnx": 7}
    assert main(["export", str(model), "--format", "qnn-onnx", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "give calibration data with --calib" in capsys.readouterr().err


def test_check_reports_qnn_problems_with_exit_code(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    model, calib = _example_files(tmp_path)
    qnn, ort = tmp_path / "qnn.onnx", tmp_path / "ort.onnx"
    assert main(["export", str(model), "--format", "qnn-onnx", "--calib", str(calib), "-o", str(qnn)]) == 0
    assert main(["export", str(model), "--format", "ort-onnx", "-o", str(ort)]) == 0
    capsys.readouterr()
    assert main(["check", str(qnn), "--for", "qnn"]) == 0
    assert "no problems found for qnn" in capsys.readouterr().out
    assert main(["check", str(ort), "--for", "qnn"]) == 1
    out = capsys.readouterr().out
    assert "8 problem(s) for qnn" in out and "the block scale is a float tensor, not k · s" in out


def test_run_a_bundle_and_refuse_foreign_or_tampered_ones(tmp_path, capsys):
    import numpy as np

    model, calib = _example_files(tmp_path)
    host, board = tmp_path / "host", tmp_path / "board"
    assert main(["compile", str(model), "--mode", "w4a8", "--calib", str(calib), "-o", str(host)]) == 0
    assert main(["compile", str(model), "--target", "aarch64", "-o", str(board)]) == 0
    inputs = tmp_path / "inputs.npz"
    x = np.random.default_rng(9).standard_normal((1, 64, 8, 8)).astype(np.float32)
    np.savez(inputs, x=x)
    capsys.readouterr()
    assert main(["run", str(host), "--inputs", str(inputs), "-o", str(tmp_path / "out.npz")]) == 0
    from lpbq_tvm.bundle import load_bundle

    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["y"], load_bundle(host).run({"x": x})["y"])
    assert main(["run", str(board), "--inputs", str(inputs)]) == 2
    assert "built for 'aarch64', which does not run on this machine" in capsys.readouterr().err
    params = host / "params.bin"
    data = params.read_bytes()
    params.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # (the last value may end in a zero byte)
    assert main(["run", str(host), "--inputs", str(inputs)]) == 2
    assert "params.bin is missing or does not match the manifest's sha256" in capsys.readouterr().err


def test_report_command(tmp_path, capsys):
    model, calib = _example_files(tmp_path)
    assert main(["report", str(model), "--calib", str(calib), "-o", str(tmp_path / "report")]) == 0
    assert "(weight-only, w4a8, w4a16)" in capsys.readouterr().out
    assert (tmp_path / "report" / "index.html").is_file()


def test_json_results_and_bench(tmp_path, capsys):
    import json

    model, calib = _example_files(tmp_path)
    assert main(["--json", "compile", str(model), "--target", "aarch64", "-o", str(tmp_path / "b")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 0 and result["files"] == AARCH64_BUNDLE
    assert result["weight_bytes"] == {"lpbq_packed": 64256, "float": 0}  # the aarch64 kernels' tiled layout
    assert main(["--json", "compile", str(model), "-o", str(tmp_path / "b")]) == 3
    assert json.loads(capsys.readouterr().out) == {
        "exit_code": 3,
        "error": f"{tmp_path / 'b'} exists; pass --force to replace it",
    }
    assert main(["--json", "bench", str(model), "--calib", str(calib), "--repeat", "2"]) == 0
    timings = json.loads(capsys.readouterr().out)
    assert set(timings["tvm"]) == {"fp32", "weight-only", "w4a8", "w4a16"}
    assert all(t["min_ms"] <= t["median_ms"] <= t["max_ms"] for t in timings["tvm"].values())
    ort = timings["onnxruntime_fp32"]["median_ms"]
    assert timings["tvm_vs_onnxruntime_fp32"] == {mode: t["median_ms"] / ort for mode, t in timings["tvm"].items()}


def test_interrupted_run_leaves_no_output(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the bundle is being written: exit 130, and neither the bundle nor its staging folder remain."""
    import lpbq_tvm.bundle

    model, _ = _example_files(tmp_path)

    def interrupt(compiled):  # the user presses Ctrl-C while the bundle's files are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(lpbq_tvm.bundle, "manifest", interrupt)
    assert main(["compile", str(model), "-o", str(tmp_path / "bundle")]) == 130
    assert "interrupted; no partial output was left" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "example.onnx"]
