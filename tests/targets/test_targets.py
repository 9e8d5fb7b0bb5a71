"""What each target decides: its TVM target, register file, kernel families and pipeline; the registry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from model_builders import LAYER_CASES, layer_model

from lpbq_tvm.calibration import activation_encoding
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.kernels import aarch64
from lpbq_tvm.kernels.interface import DenseLayer, IntegerArithmetic
from lpbq_tvm.kernels.x86 import dense_kernel
from lpbq_tvm.kernels.x86.isa import register_file
from lpbq_tvm.modes import LPBQ_MODES
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.targets import TARGETS, get_target
from lpbq_tvm.targets.aarch64 import NEON


def _dense_layer(rows: int = 3, integer: IntegerArithmetic | None = None, bitwidth: int = 4) -> DenseLayer:
    case = next(case for case in LAYER_CASES if case.op_type == "MatMul" and len(case.x_shape) == 2)
    config = LPBQConfig(block_size=32) if bitwidth == 4 else LPBQConfig.int8_per_channel(case.w_shape[0])
    encoded = EncodeLPBQ()(AnnotateLPBQ(config)(import_onnx(layer_model(case)).mod))
    encoding = read_encodings(encoded["main"])["w"]
    dense = np.ascontiguousarray(encoding.int_weight.T)  # MatMul [in, out] -> the canonical [out, in] view
    canonical = dataclasses.replace(encoding, channel_axis=0, block_axis=1, int_weight=dense)
    return DenseLayer(rows, case.w_shape[0], canonical, has_bias=False, integer=integer)


def test_the_registry_holds_one_target_per_name_and_names_the_known_ones():
    assert sorted(TARGETS) == ["aarch64", "aarch64-i8mm", "cpu", "htp-sim"]
    assert all(target.name == name for name, target in TARGETS.items())
    with pytest.raises(ValueError, match=r"unknown target 'gpu'; known targets: aarch64, aarch64-i8mm, cpu, htp-sim"):
        get_target("gpu")


def test_each_target_tiles_for_its_own_registers():
    cpu, aarch64 = get_target("cpu"), get_target("aarch64")
    assert cpu.register_file(cpu.tvm_target()) == register_file(cpu.tvm_target())
    assert aarch64.register_file(aarch64.tvm_target()) == NEON
    i8mm = get_target("aarch64-i8mm")
    assert i8mm.register_file(i8mm.tvm_target()) == NEON and i8mm.kernel_families == aarch64.kernel_families
    assert list(i8mm.tvm_target().attrs["mattr"]) == ["+neon", "+dotprod", "+i8mm"]
    assert (NEON.lanes, NEON.registers) == (4, 32)  # 32 q-registers of 4 floats


def test_each_provider_asks_its_family():
    """On an x86-64 host the cpu target's provider answers with the x86 family's kernel and its weights;
    the x86 family declines an aarch64 target itself; aarch64 asks its own family (tests/kernels/aarch64),
    and htp-sim has no scheduled kernels."""
    layer = _dense_layer()
    choice = get_target("cpu").kernel_provider()(layer)
    assert choice is not None and choice.name == "lpbq_dense_x86"
    assert list(choice.weights) == ["lpbq_qw", "lpbq_kw", "lpbq_s"]
    assert bool(choice.func.attrs["tirx.is_scheduled"])
    assert dense_kernel(layer, get_target("aarch64").tvm_target()) is None
    assert get_target("aarch64").kernel_provider()(layer).name == "lpbq_dense_aarch64"
    assert get_target("aarch64").kernel_families == (aarch64,) and get_target("htp-sim").kernel_provider() is None


@pytest.mark.parametrize("name", ["cpu", "aarch64"])
def test_layers_of_one_shape_share_one_kernel_whatever_their_calibration(name):
    """The input encoding is a run-time argument: two W4A8 layers of one shape, calibrated differently,
    get the same scheduled function (compiled once) and their own ``lpbq_sx`` / ``lpbq_zx`` values."""
    provide = get_target(name).kernel_provider()
    first, second = (
        provide(_dense_layer(integer=IntegerArithmetic(activation_encoding(low, 1.0, 8)))) for low in (-1.0, -0.25)
    )
    assert first.func is second.func
    assert first.weights["lpbq_sx"][0] != second.weights["lpbq_sx"][0]
    assert first.weights["lpbq_zx"][0] != second.weights["lpbq_zx"][0]
    assert (
        provide(_dense_layer(rows=5, integer=IntegerArithmetic(activation_encoding(-1.0, 1.0, 8)))).func
        is not first.func
    )


def test_the_x86_family_declines_what_it_cannot_compute():
    """int8 per-channel layers and requantized outputs take the generic kernels."""
    cpu = get_target("cpu").tvm_target()
    encoding = activation_encoding(-1.0, 1.0, 8)
    assert dense_kernel(_dense_layer(integer=IntegerArithmetic(encoding)), cpu).weights.keys() >= {"lpbq_wsum"}
    assert dense_kernel(_dense_layer(integer=IntegerArithmetic(encoding, encoding)), cpu) is None
    assert dense_kernel(_dense_layer(bitwidth=8), cpu) is None


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_has_a_pipeline_and_a_tvm_target(name):
    target = get_target(name)
    assert isinstance(target.tvm_target(), tvm.target.Target)
    assert isinstance(target.pipeline(), tvm.transform.Pass)
    assert set(target.modes) <= set(LPBQ_MODES)
    # The HTP runs calibrated encodings only: no weight-only layers, no encodings computed at run time.
    assert ("w4a8-dynamic" in target.modes) == (name != "htp-sim")
