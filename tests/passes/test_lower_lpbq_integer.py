"""LowerLPBQ integer modes (W4A8 / W4A16): TVM kernels equal the numpy integer reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from integer_layers import compiled_layer, reference_output, saturating_activations
from model_builders import LAYER_CASES, LayerCase, layer_model
from tvm.relax.frontend.onnx import from_onnx

from lpbq_tvm.calibration import activation_encoding
from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges


@st.composite
def activations(draw, shape):
    """:func:`integer_layers.saturating_activations` over drawn seeds, scales and saturated fractions."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale, saturated = draw(st.sampled_from([0.1, 1.0, 3.0])), draw(st.sampled_from([0.0, 0.1, 0.5]))
    return saturating_activations(shape, seed, scale, saturated)


@pytest.mark.parametrize("requantize", [False, True], ids=["fp32-out", "requantized"])
@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_integer_kernel_is_bit_exact(case, mode, requantize):
    _check_bit_exact(case, mode, requantize, "lpbq")


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_int8_per_channel_kernel_is_bit_exact(case, mode):
    """int8 per-channel layers (a mixed-precision choice) read 8-bit codes, requantized as on the HTP."""
    _check_bit_exact(case, mode, True, "int8")


DENSE_CASES = [case for case in LAYER_CASES if case.op_type != "Conv"]


@pytest.mark.parametrize("codes", ["lpbq", "int8"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c.name)
def test_dynamic_rows_are_bit_exact(case, codes):
    """w4a8-dynamic: each row's scale computed at run time (the scheduled kernel's, or the generic one's for
    int8 per-channel codes), bit-exact with the reference, on activations of any scale."""
    _check_bit_exact(case, "w4a8-dynamic", False, codes)


def test_dynamic_mode_refuses_a_convolution():
    case = next(case for case in LAYER_CASES if case.op_type == "Conv")
    with pytest.raises(ValueError, match=r"mode w4a8-dynamic quantizes the rows of dense layers .*shape \["):
        compiled_layer(case, "w4a8-dynamic", False)


def _check_bit_exact(case: LayerCase, mode: str, requantize: bool, codes: str) -> None:
    compiled, encoding, bias = compiled_layer(case, mode, requantize, codes)
    assert encoding.is_per_channel == (codes == "int8")

    @settings(max_examples=8, deadline=None)
    @given(activations(case.x_shape))
    def check(x):
        (actual,) = compiled.run({"x": x}).values()
        expected = reference_output(case, encoding, bias, x, mode, requantize)
        np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))

    check()


def test_requantized_bias_add_keeps_both_roundings():
    """A requantized Gemm's pre-bias dequantization ``(code - z) · s`` and its bias add stay two roundings:
    contracted into one FMA (as LLVM did where the two stages shared a loop) they differ by an ulp, which
    the fine 16-bit output grid turns into a whole step on values at a rounding tie; of these 72 inputs
    five met one."""
    case = next(case for case in LAYER_CASES if case.name == "gemm_transb0_bias")
    compiled, encoding, bias = compiled_layer(case, "w4a16", True)
    for seed in range(8):
        for scale in (0.1, 1.0, 3.0):
            for saturated in (0.0, 0.1, 0.5):
                x = saturating_activations(case.x_shape, seed, scale, saturated)
                (actual,) = compiled.run({"x": x}).values()
                expected = reference_output(case, encoding, bias, x, "w4a16", True)
                np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def test_w4a16_accumulates_in_int64():
    """K = 1024 inputs at the top code times weights at the int8 extreme overflow int32; the result is exact."""
    case = LayerCase("gemm_wide", "Gemm", (1, 1024), (4, 1024), attrs={"transB": 1})
    weight = np.full(case.w_shape, -8.0, np.float32)  # q = -8, k = 16 everywhere: q·k = -128
    model = layer_model(case, weight=weight)
    mod = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=64))(from_onnx(model, keep_params_in_input=True)))
    mod = attach_activation_ranges(mod, {"w": {"input": (0.0, 1.0)}})
    x = np.ones(case.x_shape, np.float32)  # code 65535, zero point 0
    acc = 65535 * -128 * 1024
    assert acc < np.iinfo(np.int32).min
    (actual,) = build(LowerLPBQ("w4a16")(mod)).run({"x": x}).values()
    encoding = read_encodings(mod["main"])["w"]
    expected = np.float32(acc) * np.float32(activation_encoding(0.0, 1.0, 16).scale)
    expected = expected * encoding.per_channel_scale.astype(np.float32)
    np.testing.assert_array_equal(actual, np.broadcast_to(expected, (1, 4)))


def test_integer_mode_without_ranges_names_the_layer():
    mod = from_onnx(layer_model(LAYER_CASES[0]), keep_params_in_input=True)
    encoded = EncodeLPBQ()(AnnotateLPBQ()(mod))
    with pytest.raises(ValueError, match=r"w: mode w4a8 needs the calibrated activation range of this layer's input"):
        LowerLPBQ("w4a8")(encoded)


@pytest.mark.parametrize("mode", ["weight-only", "w4a8-dynamic"])
def test_requantize_needs_a_calibrated_integer_mode(mode):
    with pytest.raises(ValueError, match=r"requantize_outputs needs a calibrated integer mode"):
        LowerLPBQ(mode, requantize_outputs=True)
