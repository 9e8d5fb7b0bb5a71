"""Private helpers of the ONNX exporters: opset 21, initializers, node rewriting, validation sessions."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from lpbq_tvm.encoder import LPBQEncoding

EXPORT_OPSET = 21  # blocked DequantizeLinear and INT4 tensors


def upgrade(model: onnx.ModelProto, opset: int = EXPORT_OPSET) -> onnx.ModelProto:
    """A copy of ``model`` at ``opset`` or above (the default domain), keeping every other domain."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        upgraded = onnx.ModelProto()
        upgraded.CopyFrom(model)
        return upgraded
    upgraded = version_converter.convert_version(model, opset)
    upgraded.ir_version = max(upgraded.ir_version, 10)  # INT4 needs IR 10
    return upgraded


def int4_tensor(name: str, values: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, values.shape, values.astype(np.int8).ravel().tolist())


def kn_codes(encoding: LPBQEncoding) -> tuple[np.ndarray, np.ndarray]:
    """``q`` as ``[K, N]`` and ``k`` as ``[nb, N]`` (input channels first), the MatMul weight layout."""
    return encoding.canonical_int_weight().T, encoding.per_block_int_scale.T


def int8_weight_dq(node: onnx.NodeProto, encoding: LPBQEncoding, inits: list[TensorProto]) -> onnx.NodeProto:
    """``DequantizeLinear(q·k: INT8, s: FLOAT [C], 0, axis=channel axis) -> <weight>.dq``: the exact
    int8 per-channel form of ``node``'s weight, in the weight's own layout."""
    weight = node.input[1]
    inits += [
        numpy_helper.from_array(encoding.expanded_int_weight().astype(np.int8), f"{weight}.int8"),
        numpy_helper.from_array(encoding.per_channel_scale.astype(np.float32), f"{weight}.scale"),
        numpy_helper.from_array(np.zeros(encoding.num_channels, np.int8), f"{weight}.zero_point"),
    ]
    return helper.make_node(
        "DequantizeLinear",
        [f"{weight}.int8", f"{weight}.scale", f"{weight}.zero_point"],
        [f"{weight}.dq"],
        name=f"{node.name}/weight_dq",
        axis=encoding.channel_axis,
    )


def gemm_attributes(node: onnx.NodeProto) -> dict:
    """A Gemm's attributes, refusing the forms an exporter cannot write as MatMul + Add."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        msg = f"{node.name}: Gemm with transA, alpha or beta != 1 cannot be exported as MatMul + Add"
        raise ValueError(msg)
    return attributes


def rewrite_layers(
    model: onnx.ModelProto,
    encodings: Mapping[str, LPBQEncoding],
    rewrite: Callable[[onnx.NodeProto, LPBQEncoding, list[TensorProto]], list[onnx.NodeProto]],
) -> onnx.ModelProto:
    """Replace every node whose weight (input 1) has an LPBQ encoding with ``rewrite(node, encoding, inits)``.

    ``rewrite`` appends the initializers it needs to ``inits``; the fp32 weights it replaced are dropped.
    """
    graph = model.graph
    nodes, initializers = [], []
    replaced = set()
    for node in graph.node:
        if len(node.input) > 1 and node.input[1] in encodings:
            nodes += rewrite(node, encodings[node.input[1]], initializers)
            replaced.add(node.input[1])
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input} | {output.name for output in graph.output}
    # Constants only the replaced nodes read (e.g. a float bias now stored quantized) go too.
    nodes = [node for node in nodes if node.op_type != "Constant" or node.output[0] in used]
    kept = [init for init in graph.initializer if init.name not in replaced or init.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + initializers)
    return model


# MatMulNBits (which onnxruntime fuses blocked INT4 and int8 per-channel DequantizeLinear -> MatMul
# into) in fp32 arithmetic; its default may quantize the activation to int8.
FP32_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session(
    model: onnx.ModelProto,
    optimized_path: str | None = None,
    disabled_optimizers: tuple[str, ...] = (),
    *,
    optimize: bool = True,
    **config: str,
):
    """An onnxruntime CPU session (errors only in the log) with session config entries; ``optimize=False``
    runs the graph as written, without onnxruntime's graph rewrites."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )


def bias_array(
    model: onnx.ModelProto, node: onnx.NodeProto, weights: Mapping[str, np.ndarray] | None = None
) -> np.ndarray | None:
    """The constant bias (input 2) of a Gemm / Conv node, if it has one; ``weights``: values of tensors
    the model takes as inputs (a skeleton's)."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    if weights is not None and node.input[2] in weights:
        return weights[node.input[2]]
    for init in model.graph.initializer:
        if init.name == node.input[2]:
            return numpy_helper.to_array(init)
    for other in model.graph.node:
        if other.op_type == "Constant" and other.output[0] == node.input[2]:
            return numpy_helper.to_array(other.attribute[0].t)
    msg = f"{node.name}: bias {node.input[2]!r} is not a constant"
    raise ValueError(msg)
