"""Single integer LPBQ layers (W4A8 / W4A16) built for a target, and what the numpy reference says they compute.

Shared by the pass tests (built for the host) and the aarch64 device tests (built for the board).
"""

from __future__ import annotations

import functools

import numpy as np
from model_builders import LayerCase, layer_model
from onnx import numpy_helper

from lpbq_tvm import reference
from lpbq_tvm.calibration import RowwiseEncoding, activation_encoding
from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.packing import pack, unpack
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges
from lpbq_tvm.targets import get_target

BLOCK_SIZE = 32
INPUT_RANGE = (-1.5, 2.0)  # narrower than the N(0, 1) inputs: codes saturate at 0 and 2**bw - 1
OUTPUT_RANGE = (-20.0, 25.0)
PRE_BIAS_RANGE = (-18.0, 21.0)


def extreme_weight(case: LayerCase, seed: int) -> np.ndarray:
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


def lpbq_config(case: LayerCase, codes: str) -> LPBQConfig:
    """LPBQ W4 B32, or int8 per channel: 8-bit codes, k = 1, one block of all input channels."""
    if codes == "lpbq":
        return LPBQConfig(block_size=BLOCK_SIZE)
    return LPBQConfig.int8_per_channel(case.w_shape[1] if case.op_type == "Conv" else case.x_shape[-1])


@functools.cache
def compiled_layer(case: LayerCase, mode: str, requantize: bool, codes: str = "lpbq", target: str = "cpu"):
    """``case`` with :func:`extreme_weight` lowered to ``mode`` and built for ``target``; its encoding and bias."""
    model = layer_model(case, seed=5, weight=extreme_weight(case, 5))
    imported = import_onnx(model).mod  # with the ONNX node table: op type and whether the node adds the bias
    mod = EncodeLPBQ()(AnnotateLPBQ(lpbq_config(case, codes))(imported))
    encoding = read_encodings(mod["main"])["w"]
    ranges = {"input": INPUT_RANGE, "output": OUTPUT_RANGE, "pre_bias": PRE_BIAS_RANGE}
    mod = attach_activation_ranges(mod, {"w": ranges})
    kernels = get_target(target).kernel_provider()
    compiled = build(LowerLPBQ(mode, requantize_outputs=requantize, kernels=kernels)(mod), target)
    bias = next((numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "b"), None)
    return compiled, encoding, bias


def reference_output(case, encoding, bias, x, mode, requantize):
    """What :mod:`lpbq_tvm.reference` computes for a layer of :func:`compiled_layer`."""
    bits = 16 if mode == "w4a16" else 8
    input_encoding = RowwiseEncoding() if mode == "w4a8-dynamic" else activation_encoding(*INPUT_RANGE, bits)
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


def saturating_activations(shape, seed: int, scale: float, saturated: float) -> np.ndarray:
    """N(0, ``scale``) values with a ``saturated`` fraction pinned to the ends of the input range (or far beyond)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    pinned = rng.random(shape) < saturated
    x[pinned] = rng.choice([-100.0, 100.0, INPUT_RANGE[0], INPUT_RANGE[1]], size=int(pinned.sum()))
    return x.astype(np.float32)
