"""LowerLPBQ integer modes (W4A8 / W4A16): TVM kernels equal the numpy integer reference bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_builders import LAYER_CASES, LayerCase, layer_model
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx

from lpbq_tvm import reference
from lpbq_tvm.calibration import activation_encoding
from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.packing import pack, unpack
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges

BLOCK_SIZE = 32
INPUT_RANGE = (-1.5, 2.0)  # narrower than the N(0, 1) inputs: codes saturate at 0 and 2**bw - 1
OUTPUT_RANGE = (-20.0, 25.0)
PRE_BIAS_RANGE = (-18.0, 21.0)


def _extreme_weight(case: LayerCase, seed: int) -> np.ndarray:
    """Gaussian weights whose first element per channel is the block minimum -> q = -8 with k = 16.

    -5.3 rather than -8: the channel scale s = 5.3 / 8 / 16 is no power of two, so the epilogue's
    float32 operation order matters and is checked.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(case.w_shape).astype(np.float32)
    channel_axis = 0 if case.op_type == "Conv" or case.attrs.get("transB") else 1
    first = [slice(None)] * weight.ndim
    first[1 - channel_axis if case.op_type != "Conv" else 1] = 0
    for axis in range(2, weight.ndim):
        first[axis] = 0
    weight[tuple(first)] = -5.3
    return weight


def _config(case: LayerCase, codes: str) -> LPBQConfig:
    """LPBQ W4 B32, or int8 per channel: 8-bit codes, k = 1, one block of all input channels."""
    if codes == "lpbq":
        return LPBQConfig(block_size=BLOCK_SIZE)
    return LPBQConfig.int8_per_channel(case.w_shape[1] if case.op_type == "Conv" else case.x_shape[-1])


@functools.cache
def _compiled(case: LayerCase, mode: str, requantize: bool, codes: str = "lpbq"):
    model = layer_model(case, seed=5, weight=_extreme_weight(case, 5))
    imported = import_onnx(model).mod  # with the ONNX node table: op type and whether the node adds the bias
    mod = EncodeLPBQ()(AnnotateLPBQ(_config(case, codes))(imported))
    encoding = read_encodings(mod["main"])["w"]
    ranges = {"input": INPUT_RANGE, "output": OUTPUT_RANGE, "pre_bias": PRE_BIAS_RANGE}
    mod = attach_activation_ranges(mod, {"w": ranges})
    compiled = build(LowerLPBQ(mode, requantize_outputs=requantize)(mod))
    bias = next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "b"), None)
    return compiled, encoding, bias


def _reference(case, encoding, bias, x, mode, requantize):
    bits = 8 if mode == "w4a8" else 16
    input_encoding = activation_encoding(*INPUT_RANGE, bits)
    output_encoding = activation_encoding(*OUTPUT_RANGE, bits) if requantize else None
    # A Gemm's bias add is its own ONNX-level step: requantized before it too (QNN MatMul -> Q/DQ -> Add);
    # an int8 per-channel Gemm is exported whole (int32 bias), so it is not.
    lpbq_gemm_bias = case.op_type == "Gemm" and case.bias and not encoding.is_per_channel
    pre_bias = activation_encoding(*PRE_BIAS_RANGE, bits) if requantize and lpbq_gemm_bias else None
    q, k, s = unpack(pack(encoding))
    weight = reference.int_weight(q, k, q.shape[1] // k.shape[1])
    if case.op_type == "Conv":
        attrs = case.attrs
        spatial = len(case.w_shape) - 2
        pads = attrs.get("pads", [0] * 2 * spatial)
        return reference.conv_int(
            x,
            weight.reshape(case.w_shape),
            s,
            input_encoding,
            bias,
            output_encoding,
            strides=attrs.get("strides", [1] * spatial),
            padding=pads,
            dilation=attrs.get("dilations", [1] * spatial),
            groups=attrs.get("group", 1),
        )
    return reference.dense_int(x, weight, s, input_encoding, bias, output_encoding, pre_bias)


@st.composite
def activations(draw, shape):
    """N(0, σ) values with some entries pinned to the saturating ends of the input range."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    saturate = rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    x[saturate] = rng.choice([-100.0, 100.0, INPUT_RANGE[0], INPUT_RANGE[1]], size=int(saturate.sum()))
    return x.astype(np.float32)


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


def _check_bit_exact(case: LayerCase, mode: str, requantize: bool, codes: str) -> None:
    compiled, encoding, bias = _compiled(case, mode, requantize, codes)
    assert encoding.is_per_channel == (codes == "int8")

    @settings(max_examples=8, deadline=None)
    @given(activations(case.x_shape))
    def check(x):
        (actual,) = compiled.run({"x": x}).values()
        expected = _reference(case, encoding, bias, x, mode, requantize)
        np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))

    check()


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


def test_requantize_needs_an_integer_mode():
    with pytest.raises(ValueError, match=r"requantize_outputs needs an integer mode"):
        LowerLPBQ("weight-only", requantize_outputs=True)
