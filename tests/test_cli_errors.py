"""Bad input through the real `lpbq-tvm` entry point: one line on stderr, a distinct exit code, no output."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

from lpbq_tvm.examples import build_example_model

BAD_INPUT, EXISTS, IO = 2, 3, 4


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpbq_tvm", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _assert_failed(result, code: int, message: str):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    onnx.save(build_example_model(), folder / "example.onnx")
    return folder


def _outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _nan_model(folder: Path) -> Path:
    model = build_example_model()
    weight = numpy_helper.to_array(model.graph.initializer[2]).copy()
    weight[0, 0] = np.nan
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(weight, "fc1.weight"))
    onnx.save(model, folder / "nan.onnx")
    return folder / "nan.onnx"


@pytest.mark.parametrize(
    ("make_args", "code", "message"),
    [
        (
            lambda d: ["compile", "missing.onnx", "-o", "out"],
            BAD_INPUT,
            "cannot read ONNX model 'missing.onnx': no such file",
        ),
        (lambda d: ["compile", str(d), "-o", "out"], BAD_INPUT, "it is a directory"),
        (lambda d: ["compile", "random.onnx", "-o", "out"], BAD_INPUT, "not a valid ONNX file"),
        (lambda d: ["compile", "truncated.onnx", "-o", "out"], BAD_INPUT, "cannot read ONNX model 'truncated.onnx'"),
        (lambda d: ["compile", "invalid.onnx", "-o", "out"], BAD_INPUT, "fails the ONNX checker"),
        (lambda d: ["compile", "unsupported.onnx", "-o", "out"], BAD_INPUT, "does not support: Det (nodes: det)"),
        (
            lambda d: ["compile", str(_nan_model(d)), "-o", "out"],
            BAD_INPUT,
            "fc1: weight shape (256, 128) contains non-finite",
        ),
        (
            lambda d: ["compile", "example.onnx", "--block-size", "96", "--strict", "-o", "out"],
            BAD_INPUT,
            "is not divisible by block_size 96",
        ),
        (
            lambda d: ["compile", "example.onnx", "--bitwidth", "8", "--decompressed-bw", "4", "-o", "out"],
            BAD_INPUT,
            "decompressed_bw 4 must lie in bitwidth (8) .. 16",
        ),
        (
            lambda d: ["compile", "example.onnx", "--block-size", "0", "-o", "out"],
            BAD_INPUT,
            "block_size must be positive",
        ),
        (
            lambda d: ["compile", "example.onnx", "--block-size", "-8", "-o", "out"],
            BAD_INPUT,
            "block_size must be positive",
        ),
        (
            lambda d: ["compile", "example.onnx", "--block-size", "7", "-o", "out"],
            BAD_INPUT,
            "block_size 7 fits none of the 3 selected layers",
        ),
        (
            lambda d: ["compile", "example.onnx", "--exclude", "nope", "-o", "out"],
            BAD_INPUT,
            "excluded_nodes names 'nope', which are not Gemm/MatMul/Conv nodes",
        ),
        (
            lambda d: ["compile", "example.onnx", "--input-shape", "x=1,64,a", "-o", "out"],
            BAD_INPUT,
            "--input-shape 'x=1,64,a' is not NAME=D1,D2,...",
        ),
        (
            lambda d: ["compile", "example.onnx", "--input-shape", "x=1,64,8", "-o", "out"],
            BAD_INPUT,
            "the override [1, 64, 8] does not match it",
        ),
        (lambda d: ["compile", "example.onnx", "-o", "exists"], EXISTS, "exists; pass --force to replace it"),
        (
            lambda d: ["export", "example.onnx", "--format", "aimet-json", "-o", "link.json"],
            EXISTS,
            "is a symbolic link; refusing to write through it",
        ),
        (
            lambda d: ["export", "example.onnx", "--format", "aimet-json", "-o", "afile/out.json"],
            IO,
            "cannot write afile/out.json: afile is not a directory",
        ),
        (
            lambda d: ["compile", "outside.onnx", "-o", "out"],
            BAD_INPUT,
            "points outside the model's folder ('../secret.bin')",
        ),
        (
            lambda d: ["compile", "linked.onnx", "-o", "out"],
            BAD_INPUT,
            "points outside the model's folder ('weights.bin')",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "random-bytes",
        "truncated",
        "checker",
        "unsupported-op",
        "nan-weights",
        "strict",
        "bitwidths",
        "block-0",
        "block-negative",
        "block-divides-nothing",
        "unknown-exclude",
        "shape-malformed",
        "shape-mismatch",
        "output-exists",
        "output-symlink",
        "unwritable",
        "external-dotdot",
        "external-symlink",
    ],
)
def test_bad_input(workdir, tmp_path, make_args, code, message):
    (tmp_path / "random.onnx").write_bytes(os.urandom(4096))
    example = (workdir / "example.onnx").read_bytes()
    (tmp_path / "example.onnx").write_bytes(example)
    (tmp_path / "truncated.onnx").write_bytes(example[: len(example) // 3])
    invalid = build_example_model()
    invalid.graph.node[0].input[0] = "undefined_tensor"
    onnx.save(invalid, tmp_path / "invalid.onnx")
    det = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    onnx.save(helper.make_model(det, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "unsupported.onnx")
    (tmp_path / "exists").mkdir()
    (tmp_path / "elsewhere.json").write_text("keep")
    (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "afile").write_text("a file, not a directory")
    _external_models(tmp_path)
    args = make_args(tmp_path)
    before = _outputs(tmp_path)
    result = _cli(*args, cwd=tmp_path)
    _assert_failed(result, code, message)
    assert _outputs(tmp_path) == before  # nothing written, nothing half-written
    assert (tmp_path / "elsewhere.json").read_text() == "keep"


def _external_models(folder: Path) -> None:
    """outside.onnx reads '../secret.bin'; linked.onnx reads 'weights.bin', a symlink leaving the folder."""
    for name, location in (("outside.onnx", "../secret.bin"), ("linked.onnx", "weights.bin")):
        model = build_example_model()
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        (folder / name).write_bytes(model.SerializeToString())  # onnx.save would refuse the location itself
    real = folder.parent / f"{folder.name}-real-weights.bin"
    real.write_bytes(b"\0" * 1024)
    (folder / "weights.bin").symlink_to(real)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mutation=st.sampled_from(["flip", "truncate", "zero", "none"]),
    position=st.floats(0.0, 1.0),
    flags=st.lists(
        st.sampled_from(
            [
                ["--block-size", "32"],
                ["--block-size", "0"],
                ["--bitwidth", "3"],
                ["--decompressed-bw", "2"],
                ["--strict"],
                ["--op-types", "Gemm"],
                ["--op-types", "Softmax"],
                ["--exclude", "fc1"],
                ["--encoder", "mse"],
                ["--input-shape", "x=1,64,8,8"],
                ["--input-shape", "y=2"],
                ["--mode", "w4a8"],
            ]
        ),
        max_size=3,
    ),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_models_and_flags_never_crash_or_leave_partial_output(
    workdir, tmp_path, mutation, position, flags, seed
):
    """Mutated model bytes and random flag combinations: an exit code and either a whole bundle or nothing."""
    from lpbq_tvm.cli import main

    data = bytearray((workdir / "example.onnx").read_bytes())
    index = int(position * (len(data) - 1))
    rng = np.random.default_rng(seed)
    if mutation == "flip":
        data[index] ^= int(rng.integers(1, 256))
    elif mutation == "truncate":
        data = data[:index]
    elif mutation == "zero":
        data[index : index + 64] = bytes(len(data[index : index + 64]))
    case = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    (case / "model.onnx").write_bytes(bytes(data))
    out = case / "bundle"
    code = main(["-q", "compile", str(case / "model.onnx"), "-o", str(out), *[f for flag in flags for f in flag]])
    assert code in (0, 2, 3, 4, 5)
    if code == 0:
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so", "params.bin"]
    else:
        assert sorted(p.name for p in case.iterdir()) == ["model.onnx"]
