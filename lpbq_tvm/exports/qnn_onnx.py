"""ONNX for Qualcomm's QNN execution provider: the LPBQ QDQ pattern with quantized activations (opset 21).

Two steps. :func:`quantize_activations` puts ``Q -> DQ`` (uint8 / uint16, per tensor, the
calibrated encoding) after every activation it is given — by default every float tensor of the
model, as AIMET's QDQ export does, or only the LPBQ layers' inputs and outputs — keeping the
fp32 weights: this is the graph the ``htp-sim`` target compiles. A node output ``t`` is then
written by its node as ``t/float`` and ``t`` is the dequantized value, so every reader, including
the graph output, sees the quantized one; a graph input ``x`` is read as ``x/dq``. Each tensor
gets one pair; integer and bool tensors and constants are left alone.

:func:`export_qnn_onnx` then rewrites each LPBQ MatMul / Gemm (docs/design.md §5; Gemm is written as
MatMul + Add, since the QNN Gemm fusion drops biases and misreads transB=0)::

    k: UINT8 [nb, N] (1..16)   s: FLOAT [N]   zk: UINT8 [N] = 0
    scale = DequantizeLinear(k, s, zk, axis=1)                                   # FLOAT [nb, N]
    w     = DequantizeLinear(q: INT4 [K, N], scale, zq: INT4 [nb, N] = 0, axis=0, block_size=B)
    x -> Q -> DQ -> MatMul(·, w) -> Q -> DQ [-> Add(·, DQ(bias: UINT16 per tensor)) -> Q -> DQ]

where the input and output pairs are those of step one and the pair before the bias add uses the
layer's ``pre_bias`` encoding. Per LPBQ Conv, its exact int8 per-channel equivalent (the runtime
has no LPBQ conv fusion): ``w = DequantizeLinear(q·k: INT8, s, 0, axis=0)``, bias (a Conv input)
as INT32 with scale ``sx·s``, ``x -> Q -> DQ -> Conv -> Q -> DQ``; int8 per-channel layers (a
mixed-precision choice) the same way, keeping their op (MatMul / Gemm) and the weight's channel
axis. onnxruntime CPU runs the result in float on the dequantized values, within one output LSB
of ``htp-sim`` per requantization.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lpbq_tvm.calibration import ActivationEncoding, activation_encoding
from lpbq_tvm.encoder import LPBQEncoding
from lpbq_tvm.exports._onnx_graph import (
    bias_array,
    gemm_attributes,
    int4_tensor,
    int8_weight_dq,
    kn_codes,
    rewrite_layers,
    upgrade,
)
from lpbq_tvm.exports.qnn_check import check_qnn

__all__ = ["export_qnn_onnx", "quantize_activations"]


class _QDQBuilder:
    """Emits Q -> DQ pairs, one per (tensor, encoding), and the constants they need."""

    def __init__(self, inits: list) -> None:
        self.inits = inits

    def qdq(
        self, tensor: str, encoding: ActivationEncoding, prefix: str, output: str | None = None
    ) -> tuple[list, str]:
        """``tensor -> Q -> DQ``; names start with ``prefix`` (unique per layer and role)."""
        dtype = np.uint8 if encoding.bitwidth <= 8 else np.uint16
        scale, zero = f"{prefix}/scale", f"{prefix}/zero_point"
        self.inits += [
            numpy_helper.from_array(np.array(encoding.scale, np.float32), scale),
            numpy_helper.from_array(np.array(encoding.zero_point, dtype), zero),
        ]
        output = output or f"{prefix}/dq"
        nodes = [
            helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{prefix}/q"], name=f"{prefix}/quantize"),
            helper.make_node("DequantizeLinear", [f"{prefix}/q", scale, zero], [output], name=f"{prefix}/dequantize"),
        ]
        return nodes, output


def _conv_bias_dq(name: str, bias: np.ndarray, scale: np.ndarray, inits: list, node_name: str) -> tuple[list, str]:
    """A Conv bias as INT32 with per-channel scale ``sx · s`` (the accumulator's grid), dequantized."""
    scale = scale.astype(np.float32)
    codes = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    inits += [numpy_helper.from_array(codes, f"{name}.int32"), numpy_helper.from_array(scale, f"{name}.int32_scale")]
    node = helper.make_node(
        "DequantizeLinear",
        [f"{name}.int32", f"{name}.int32_scale"],
        [f"{name}.dq"],
        name=f"{node_name}/bias_dq",
        axis=0,
    )
    return [node], f"{name}.dq"


def _add_bias_dq(name: str, bias: np.ndarray, inits: list, node_name: str) -> tuple[list, str]:
    """A bias for an ``Add`` as per-tensor UINT16 over its own range: the QNN EP rejects a standalone
    per-channel DequantizeLinear and an INT32 per-tensor one; uint16 keeps the error far below one LSB."""
    encoding = activation_encoding(float(bias.min()), float(bias.max()), 16)
    inits += [
        numpy_helper.from_array(encoding.quantize(bias), f"{name}.uint16"),
        numpy_helper.from_array(np.array(encoding.scale, np.float32), f"{name}.uint16_scale"),
        numpy_helper.from_array(np.array(encoding.zero_point, np.uint16), f"{name}.uint16_zero_point"),
    ]
    node = helper.make_node(
        "DequantizeLinear",
        [f"{name}.uint16", f"{name}.uint16_scale", f"{name}.uint16_zero_point"],
        [f"{name}.dq"],
        name=f"{node_name}/bias_dq",
    )
    return [node], f"{name}.dq"


def quantize_activations(
    model: onnx.ModelProto,
    layers: Mapping[str, Mapping[str, ActivationEncoding]],
    tensors: Mapping[str, ActivationEncoding] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` (opset 21) with ``Q -> DQ`` after every tensor of ``tensors`` (graph inputs and
    node outputs, by name) and every LPBQ layer's input and output (``layers``: weight name ->
    {"input", "output", ...} encodings); see the module docstring. Where both name a tensor, they must agree."""
    tensors = dict(tensors or {})
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in layers:
            continue
        for role, tensor in (("input", node.input[0]), ("output", node.output[0])):
            encoding = layers[node.input[1]][role]
            if tensors.setdefault(tensor, encoding) != encoding:
                msg = (
                    f"{node.name}: {role} {tensor!r} is encoded as {tensors[tensor]} as a tensor, {encoding} as a layer"
                )
                raise ValueError(msg)
    quantized = upgrade(model)
    graph, initializers = quantized.graph, []
    builder = _QDQBuilder(initializers)
    nodes, readers_see, seen = [], {}, set()
    for info in graph.input:
        if info.name in tensors:
            pair, readers_see[info.name] = builder.qdq(info.name, tensors[info.name], info.name)
            nodes += pair
            seen.add(info.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = readers_see.get(name, name)
        nodes.append(node)
        for index, name in enumerate(node.output):
            if name in tensors:
                node.output[index] = f"{name}/float"
                nodes += builder.qdq(node.output[index], tensors[name], name, output=name)[0]
                seen.add(name)
    missing = sorted(tensors.keys() - seen)
    if missing:
        raise ValueError(f"no graph input or node output named {', '.join(map(repr, missing))} to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    return quantized


def export_qnn_onnx(
    model: onnx.ModelProto,
    encodings: Mapping[str, LPBQEncoding],
    activations: Mapping[str, Mapping[str, ActivationEncoding]],
    tensors: Mapping[str, ActivationEncoding] | None = None,
) -> onnx.ModelProto:
    """``activations``: weight name -> {"input", "output"[, "pre_bias"]} encodings of that layer;
    ``tensors``: encodings of the other activations to quantize, by tensor name (all of them, as
    ``sim.tensor_activation_encodings(bits)`` gives; default none: only the LPBQ layers' inputs and outputs)."""
    _check_exportable(encodings, activations)
    source = quantize_activations(model, activations, tensors)

    def rewrite(node: onnx.NodeProto, encoding: LPBQEncoding, inits: list) -> list[onnx.NodeProto]:
        # The input is dequantized and the output quantized already (step one); see the module docstring.
        layer_encodings, bias = activations[node.input[1]], bias_array(source, node)
        if node.op_type == "Conv" or encoding.is_per_channel:
            return _int8_layer(node, encoding, layer_encodings, bias, inits)
        return _lpbq_matmul(node, encoding, layer_encodings, bias, inits)

    exported = rewrite_layers(source, encodings, rewrite)
    onnx.checker.check_model(exported, full_check=True)
    findings = check_qnn(exported)
    if findings:
        raise ValueError("the QNN export fails the pre-flight check: " + "; ".join(map(str, findings)))
    return exported


def _check_exportable(encodings: Mapping[str, LPBQEncoding], activations: Mapping[str, Mapping]) -> None:
    for name, encoding in encodings.items():
        lpbq = encoding.bitwidth == 4 and encoding.decompressed_bw == 8
        if not (lpbq or encoding.is_per_channel and encoding.bitwidth == 8) or encoding.float_scale.shape[1] != 1:
            msg = (
                f"{name}: the QNN export needs LPBQ with bitwidth 4, decompressed_bw 8 (or int8 per channel) "
                "and one float scale per channel"
            )
            raise ValueError(msg)
        if name not in activations:
            msg = f"{name}: no calibrated activation encodings; run sim.compute_encodings(callback, args) first"
            raise ValueError(msg)


def _int8_layer(node, encoding: LPBQEncoding, encodings, bias, inits: list) -> list[onnx.NodeProto]:
    """A Conv, or an int8 per-channel layer, with its exact int8 per-channel weight (and INT32 bias)."""
    weight = node.input[1]
    layer = onnx.NodeProto()
    layer.CopyFrom(node)
    layer.input[1] = f"{weight}.dq"
    nodes = [int8_weight_dq(node, encoding, inits)]
    if bias is not None:
        sx_s = np.float32(encodings["input"].scale) * encoding.per_channel_scale.astype(np.float32)
        bias_nodes, bias_name = _conv_bias_dq(node.input[2], bias, sx_s, inits, node.name)
        nodes += bias_nodes
        layer.input[2] = bias_name
    return [*nodes, layer]


def _lpbq_matmul(node, encoding: LPBQEncoding, encodings, bias, inits: list) -> list[onnx.NodeProto]:
    """An LPBQ MatMul or Gemm as ``DQ(k) -> DQ(q: INT4, block_size) -> MatMul`` [``-> Q/DQ -> Add(bias)``]."""
    weight, x, output = node.input[1], node.input[0], node.output[0]
    if node.op_type == "Gemm":
        gemm_attributes(node)
    q, k = kn_codes(encoding)
    channels, blocks = encoding.num_channels, encoding.num_blocks
    inits += [
        numpy_helper.from_array(k.astype(np.uint8), f"{weight}.k"),
        numpy_helper.from_array(encoding.per_channel_scale.astype(np.float32), f"{weight}.scale"),
        numpy_helper.from_array(np.zeros(channels, np.uint8), f"{weight}.k_zero_point"),
        int4_tensor(f"{weight}.int4", q),
        int4_tensor(f"{weight}.int4_zero_point", np.zeros((blocks, channels), np.int8)),
    ]
    product = output if bias is None else f"{output}/matmul"
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            [f"{weight}.k", f"{weight}.scale", f"{weight}.k_zero_point"],
            [f"{weight}.block_scale"],
            name=f"{node.name}/scale_dq",
            axis=1,
        ),
        helper.make_node(
            "DequantizeLinear",
            [f"{weight}.int4", f"{weight}.block_scale", f"{weight}.int4_zero_point"],
            [f"{weight}.dq"],
            name=f"{node.name}/weight_dq",
            axis=0,
            block_size=encoding.block_size,
        ),
        helper.make_node("MatMul", [x, f"{weight}.dq"], [product], name=f"{node.name}/matmul"),
    ]
    if bias is None:
        return nodes
    pre_nodes, pre = _QDQBuilder(inits).qdq(product, encodings["pre_bias"], f"{node.name}/pre_bias")
    bias_nodes, bias_name = _add_bias_dq(node.input[2], bias, inits, node.name)
    add = helper.make_node("Add", [pre, bias_name], [output], name=f"{node.name}/bias")
    return nodes + pre_nodes + bias_nodes + [add]
