"""ONNX for onnxruntime CPU: LPBQ weights as blocked INT4 ``DequantizeLinear`` feeding the layer (opset 21).

Per LPBQ MatMul / Gemm (Gemm is written as MatMul + Add)::

    q: INT4 [K, N]   scale: FLOAT [nb, N] = float32(k · s)
    DequantizeLinear(q, scale, axis=0, block_size=B) -> MatMul(x, ·) [-> Add(·, bias)]

which onnxruntime fuses into its MatMulNBits kernel (block sizes that are powers of two >= 16;
``session.qdq_matmulnbits_accuracy_level=0`` keeps fp32 arithmetic). Per LPBQ Conv, the exact
int8 per-channel form: ``DequantizeLinear(q·k: INT8, s: FLOAT [O], axis=0) -> Conv``; int8
per-channel layers (a mixed-precision choice) the same way, with the weight's channel axis.
Activations stay float: the model computes the weight-only simulation.

With ``matmulnbits=True`` each LPBQ MatMul / Gemm is written directly as onnxruntime's contrib
op ``com.microsoft.MatMulNBits`` (bits 4, the LPBQ block size, which must be a power of two >= 16)
instead of relying on the fusion, and the model keeps its own opset (at least 13, for per-channel
``DequantizeLinear``): ``B`` uint8 ``[N, K / B, B / 2]`` holds ``q + 8`` (its default zero point
is 8), two codes per byte, low nibble first along K; ``scales`` float ``[N, K / B]`` is ``k·s``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lpbq_tvm.encoder import LPBQEncoding
from lpbq_tvm.exports._onnx_graph import (
    gemm_attributes,
    int4_tensor,
    int8_weight_dq,
    kn_codes,
    rewrite_layers,
    upgrade,
)
from lpbq_tvm.packing import pack_nibbles

__all__ = ["export_ort_onnx"]


def _matmulnbits(node: onnx.NodeProto, encoding: LPBQEncoding, inits: list, output: str) -> onnx.NodeProto:
    """``com.microsoft.MatMulNBits`` computing ``node``'s product (see the module docstring)."""
    weight, block = node.input[1], encoding.block_size
    if block < 16 or block & (block - 1):
        msg = f"{node.name}: MatMulNBits needs a power-of-two block size >= 16, got {block}"
        raise ValueError(msg)
    channels, depth = encoding.num_channels, encoding.num_blocks * block
    codes = pack_nibbles(encoding.canonical_int_weight() + 8).reshape(channels, encoding.num_blocks, block // 2)
    inits += [
        numpy_helper.from_array(codes, f"{weight}.nbits"),
        numpy_helper.from_array(encoding.lpbq_scale.astype(np.float32), f"{weight}.nbits_scale"),
    ]
    return helper.make_node(
        "MatMulNBits",
        [node.input[0], f"{weight}.nbits", f"{weight}.nbits_scale"],
        [output],
        name=f"{node.name}/matmulnbits",
        domain="com.microsoft",
        K=depth,
        N=channels,
        bits=4,
        block_size=block,
        accuracy_level=0,
    )


def _rewrite(
    node: onnx.NodeProto, encoding: LPBQEncoding, inits: list, matmulnbits: bool = False
) -> list[onnx.NodeProto]:
    weight = node.input[1]
    if node.op_type == "Conv" or encoding.is_per_channel:
        dequantize = int8_weight_dq(node, encoding, inits)
        layer = onnx.NodeProto()
        layer.CopyFrom(node)
        layer.input[1] = dequantize.output[0]
        return [dequantize, layer]
    bias = None
    if node.op_type == "Gemm":
        gemm_attributes(node)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    matmul_out = f"{node.output[0]}/matmul" if bias else node.output[0]
    if matmulnbits:
        nodes = [_matmulnbits(node, encoding, inits, matmul_out)]
    else:
        q, _ = kn_codes(encoding)
        scale = encoding.lpbq_scale.T.astype(np.float32)
        inits += [int4_tensor(f"{weight}.int4", q), numpy_helper.from_array(scale, f"{weight}.block_scale")]
        nodes = [
            helper.make_node(
                "DequantizeLinear",
                [f"{weight}.int4", f"{weight}.block_scale"],
                [f"{weight}.dq"],
                name=f"{node.name}/weight_dq",
                axis=0,
                block_size=encoding.block_size,
            ),
            helper.make_node("MatMul", [node.input[0], f"{weight}.dq"], [matmul_out], name=f"{node.name}/matmul"),
        ]
    if bias:
        nodes.append(helper.make_node("Add", [matmul_out, bias], [node.output[0]], name=f"{node.name}/bias"))
    return nodes


def export_ort_onnx(
    model: onnx.ModelProto, encodings: Mapping[str, LPBQEncoding], *, matmulnbits: bool = False
) -> onnx.ModelProto:
    """The model with every LPBQ weight as blocked INT4 (MatMul / Gemm; ``MatMulNBits`` nodes with
    ``matmulnbits``) or int8 per channel (Conv, int8 per-channel layers)."""
    for name, encoding in encodings.items():
        if encoding.float_scale.shape[1] != 1 or encoding.bitwidth != 4 and not encoding.is_per_channel:
            msg = f"{name}: the onnxruntime export needs 4-bit or int8 per-channel codes, one float scale per channel"
            raise ValueError(msg)
    if matmulnbits:
        source = upgrade(model, 13)
        source.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:
        source = upgrade(model)
    exported = rewrite_layers(source, encodings, functools.partial(_rewrite, matmulnbits=matmulnbits))
    onnx.checker.check_model(exported, full_check=True)
    return exported
