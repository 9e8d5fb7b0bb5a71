"""Deployment bundles: aarch64 objects, manifests, no overwrite, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from system_tools import missing_tool
from tvm import relax

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.bundle import MANIFEST_FILE, PARAMS_FILE
from lpbq_tvm.examples import build_example_model

EM_AARCH64, EM_X86_64 = 183, 62
ET_DYN = 3  # a shared object


def require_cross_linker() -> None:
    """The cross linker comes with tools/arm64_device.sh setup, which CI runs."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        missing_tool("needs aarch64-linux-gnu-g++: run tools/arm64_device.sh setup (or install g++-aarch64-linux-gnu)")


@pytest.fixture(scope="module")
def sim():
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    data = [np.random.default_rng(seed).standard_normal((1, 64, 8, 8)).astype(np.float32) for seed in range(2)]
    sim.compute_encodings(lambda s, batches: [s.run({"x": x}) for x in batches], data)
    return sim


def _elf_machine(blob: bytes) -> int:
    assert blob[:4] == b"\x7fELF"
    return int.from_bytes(blob[18:20], "little")


def test_aarch64_bundle_holds_a_linked_library_a_feature_probe_and_a_complete_manifest(sim, tmp_path):
    require_cross_linker()
    compiled = lpbq_tvm.compile(sim, target="aarch64", mode="w4a8")
    bundle = compiled.export_bundle(tmp_path / "bundle")
    files = [MANIFEST_FILE, PARAMS_FILE, "model.so", "cpu_features.so"]
    assert sorted(p.name for p in bundle.iterdir()) == sorted(files)
    for library in ("model.so", "cpu_features.so"):
        blob = (bundle / library).read_bytes()
        assert _elf_machine(blob) == EM_AARCH64 and int.from_bytes(blob[16:18], "little") == ET_DYN
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["target"] == "aarch64" and manifest["mode"] == "w4a8" and manifest["library"] == "model.so"
    assert manifest["cpu_features"] == {"probe": "cpu_features.so", "requires": ["neon", "dotprod"]}
    assert manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 64, 8, 8], "dtype": "float32", "sequence": False}]
    assert manifest["outputs"] == [{"name": "y", "shape": [1, 64], "dtype": "float32", "sequence": False}]
    assert {p["name"] for p in manifest["params"]} == set(compiled.param_names)
    assert set(manifest["quantization"]) == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert set(manifest["versions"]) == {"lpbq-tvm", "apache-tvm", "onnx", "numpy"}
    assert set(manifest["files"]) == {PARAMS_FILE, "model.so", "cpu_features.so"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    with pytest.raises(RuntimeError, match="built for target 'aarch64', which does not run on this machine"):
        compiled.run({"x": np.zeros((1, 64, 8, 8), np.float32)})


def test_aarch64_bundle_without_the_cross_linker_holds_objects(sim, tmp_path, monkeypatch, caplog):
    """No aarch64-linux-gnu-g++ on PATH: a .tar of aarch64 objects to link on the board, and a warning."""
    compiled = lpbq_tvm.compile(sim, target="aarch64", mode="w4a8")
    tools = tmp_path / "bin"  # PATH's programs but the aarch64 toolchain (TVM writes the .tar with tar)
    tools.mkdir()
    for folder in reversed(os.environ["PATH"].split(os.pathsep)):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if not program.name.startswith("aarch64-"):
                (tools / program.name).unlink(missing_ok=True)
                (tools / program.name).symlink_to(program)
    monkeypatch.setenv("PATH", str(tools))
    bundle = compiled.export_bundle(tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == sorted([MANIFEST_FILE, PARAMS_FILE, "model.tar"])
    assert "aarch64-linux-gnu-g++ not found: the bundle holds model.tar" in caplog.text
    with tarfile.open(bundle / "model.tar") as archive:
        objects = [m for m in archive.getmembers() if m.name.endswith(".o")]
        assert objects
        assert {_elf_machine(archive.extractfile(m).read()) for m in objects} == {EM_AARCH64}
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["library"] == "model.tar" and "cpu_features" not in manifest
    with pytest.raises(RuntimeError, match=r"linking an aarch64 shared library needs aarch64-linux-gnu-g\+\+"):
        compiled.export_library(tmp_path / "model.so")
    assert compiled.export_library(tmp_path / "model.tar").is_file()


def test_host_bundle_loads_and_runs_like_the_compiled_model(sim, tmp_path):
    compiled = lpbq_tvm.compile(sim, target="cpu", mode="w4a8")
    bundle = compiled.export_bundle(tmp_path / "host")
    library = bundle / "model.so"
    assert _elf_machine(library.read_bytes()) == EM_X86_64
    params = tvm.runtime.load_param_dict((bundle / PARAMS_FILE).read_bytes())
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    x = np.random.default_rng(5).standard_normal((1, 64, 8, 8)).astype(np.float32)
    output = vm["main"](tvm.runtime.tensor(x), *[params[p["name"]] for p in manifest["params"]]).numpy()
    np.testing.assert_array_equal(output, compiled.run({"x": x})["y"])


def test_existing_bundle_is_not_overwritten(sim, tmp_path):
    compiled = lpbq_tvm.compile(sim, target="aarch64", mode="weight-only")
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        compiled.export_bundle(target)
    assert (target / "keep.txt").read_text() == "user data"
    compiled.export_bundle(target, overwrite=True)
    assert not (target / "keep.txt").exists()


def test_failed_bundle_leaves_nothing(sim, tmp_path, monkeypatch):
    compiled = lpbq_tvm.compile(sim, target="aarch64", mode="weight-only")

    def broken_export(path, **options):
        raise OSError("disk full")

    monkeypatch.setattr(compiled.executable, "export_library", broken_export, raising=False)
    with pytest.raises(OSError, match="disk full"):
        compiled.export_bundle(tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_runs_return_their_own_arrays_and_read_inputs_at_call_time(sim):
    """Inputs are copied into kept buffers and outputs copied out: a later run changes neither an
    earlier result, and an input that is a view into a larger array reads correctly."""
    compiled = lpbq_tvm.compile(sim)
    first_input, second_input = sim.random_inputs(seed=1), sim.random_inputs(seed=2)
    first = compiled.run(first_input)["y"]
    kept = first.copy()
    second = compiled.run(second_input)["y"]
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    x = first_input["x"]
    view = np.empty((2, *x.shape), x.dtype)[1]  # a view into a larger array, not at its start
    view[...] = x
    np.testing.assert_array_equal(compiled.run({"x": view})["y"], kept)


def test_compile_asks_for_encodings_instead_of_computing_them():
    """Every LPBQ mode needs sim.compute_encodings() to have run, and says so; fp32 does not."""
    fresh = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(fresh)
    with pytest.raises(RuntimeError, match=r"no encodings yet: call sim.compute_encodings\(\) first"):
        lpbq_tvm.compile(fresh, mode="weight-only")
    assert not fresh.has_encodings
    assert lpbq_tvm.compile(fresh, mode="fp32").weight_bytes.lpbq_packed == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_bfloat16_and_float8_inputs_and_outputs(dtype):
    """numpy's DLPack has no such dtypes: they come and go as ml_dtypes arrays. Casts round to nearest
    even, as ml_dtypes does, between float8's smallest normal number and its largest (ONNX's
    saturation plays no part); TVM gets float8 subnormals wrong, which the preparation warns about."""
    import ml_dtypes
    from onnx import TensorProto, helper

    onnx_type = {"bfloat16": TensorProto.BFLOAT16}.get(dtype) or getattr(TensorProto, dtype.upper().replace("_", ""))
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["narrow"], to=onnx_type),
            helper.make_node("Cast", ["n"], ["wide"], to=TensorProto.FLOAT),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40]),
            helper.make_tensor_value_info("n", onnx_type, [3, 40]),
        ],
        [
            helper.make_tensor_value_info("narrow", onnx_type, [3, 40]),
            helper.make_tensor_value_info("wide", TensorProto.FLOAT, [3, 40]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sim = QuantizationSimModel(model)
    compiled = lpbq_tvm.compile(sim, "cpu", "fp32")
    narrow_type = getattr(ml_dtypes, dtype)
    rng = np.random.default_rng(0)
    x, n = (rng.choice([-1, 1], (3, 40)) * 2.0 ** rng.uniform(-6, 5.5, (2, 3, 40))).astype(np.float32)
    n = n.astype(narrow_type)
    out = compiled.run({"x": x, "n": n})
    if dtype != "bfloat16":
        assert any("TVM converts float8 subnormals wrongly" in change for change in sim.preparation)
    assert out["narrow"].dtype == narrow_type
    np.testing.assert_array_equal(out["narrow"].view(np.uint8), x.astype(narrow_type).view(np.uint8))
    np.testing.assert_array_equal(out["wide"], n.astype(np.float32))
