"""ONNX for onnxruntime CPU: LPBQ weights as blocked INT4 ``DequantizeLinear`` feeding the layer (opset 21).

Per LPBQ MatMul / Gemm (Gemm is written as MatMul + Add)::

    q: INT4 [K, N]   scale: FLOAT [nb, N] = float32(k · s)
    DequantizeLinear(q, scale, axis=0, block_size=B) -> MatMul(x, ·) [-> Add(·, bias)]

which onnxruntime fuses into its MatMulNBits kernel (block sizes that are powers of two >= 16;
``session.qdq_matmulnbits_accuracy_level=0`` keeps fp32 arithmetic). Per LPBQ Conv, the exact
int8 per-channel form: ``DequantizeLinear(q·k: INT8, s: FLOAT [O], axis=0) -> Conv``; int8
per-channel layers (a mixed-precision choice) the same way, with the weight's channel axis.
Activations stay float: the model computes the weight-only simulation.
"""

from __future__ import annotations

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

__all__ = ["export_ort_onnx"]


def _rewrite(node: onnx.NodeProto, encoding: LPBQEncoding, inits: list) -> list[onnx.NodeProto]:
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
    ]
    matmul_out = f"{node.output[0]}/matmul" if bias else node.output[0]
    nodes.append(helper.make_node("MatMul", [node.input[0], f"{weight}.dq"], [matmul_out], name=f"{node.name}/matmul"))
    if bias:
        nodes.append(helper.make_node("Add", [matmul_out, bias], [node.output[0]], name=f"{node.name}/bias"))
    return nodes


def export_ort_onnx(model: onnx.ModelProto, encodings: Mapping[str, LPBQEncoding]) -> onnx.ModelProto:
    """The model with every LPBQ weight as blocked INT4 (MatMul / Gemm) or int8 per channel (Conv)."""
    for name, encoding in encodings.items():
        if encoding.float_scale.shape[1] != 1 or encoding.bitwidth != 4 and not encoding.is_per_channel:
            msg = f"{name}: the onnxruntime export needs 4-bit or int8 per-channel codes, one float scale per channel"
            raise ValueError(msg)
    exported = rewrite_layers(upgrade(model), encodings, _rewrite)
    onnx.checker.check_model(exported, full_check=True)
    return exported
