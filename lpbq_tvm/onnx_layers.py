"""What the quantizer finds in an ONNX graph: the LPBQ candidate layers and the activation tensors.

Candidate layers are Gemm, MatMul and Conv nodes with a constant weight, one that is an
initializer or the output of a ``Constant`` node. For each candidate this gives the node name,
op type, attributes, weight tensor name and value, and the (channel_axis, block_axis) of docs/design.md §2.

Activation tensors are the float32 values computed from the inputs, the ones calibration observes
and the QNN export quantizes: the float graph inputs and every node output that a node or the
graph output reads; not initializers or ``Constant`` outputs, not integer or bool tensors (shapes,
indices, masks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from lpbq_tvm.encoder import weight_axes

__all__ = ["LPBQ_OP_TYPES", "WeightLayer", "activation_tensors", "find_weight_layers", "constant_tensors"]

LPBQ_OP_TYPES = ("Gemm", "MatMul", "Conv")


@dataclass(frozen=True, eq=False)
class WeightLayer:
    """One Gemm / MatMul / Conv node whose weight is a constant tensor."""

    node_name: str
    op_type: str
    attributes: dict[str, Any]
    weight_name: str
    weight: np.ndarray
    channel_axis: int
    block_axis: int
    has_bias: bool  # the node adds a bias itself (Gemm C, Conv B)

    @property
    def input_channels(self) -> int:
        return self.weight.shape[self.block_axis]


def constant_tensors(graph: onnx.GraphProto, weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of ``graph`` by tensor name, and ``weights``: the values
    of tensors the graph takes as inputs (a :func:`~lpbq_tvm.onnx_model.skeleton`'s weights)."""
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer} | dict(weights or {})
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_weight_layers(model: onnx.ModelProto, weights: Mapping[str, np.ndarray] | None = None) -> list[WeightLayer]:
    """Every Gemm / MatMul / Conv of the main graph whose weight is a float constant (``weights`` gives the
    values of constants held outside the graph, see :func:`constant_tensors`), in graph order.

    The weight is input 1 (Gemm B, MatMul B, Conv W). Nodes without a name are named
    ``<OpType>_<index>``. A MatMul whose constant operand is the first input is not a candidate.
    """
    constants = constant_tensors(model.graph, weights)
    layers = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in LPBQ_OP_TYPES or len(node.input) < 2:
            continue
        weight = constants.get(node.input[1])
        if weight is None or not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2:
            continue
        attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        channel_axis, block_axis = weight_axes(node.op_type, weight.ndim, attributes)
        layers.append(
            WeightLayer(
                node_name=_node_name(node, index),
                op_type=node.op_type,
                attributes=attributes,
                weight_name=node.input[1],
                weight=weight,
                channel_axis=channel_axis,
                block_axis=block_axis,
                has_bias=len(node.input) > 2 and bool(node.input[2]),
            )
        )
    return layers


def activation_tensors(model: onnx.ModelProto, weights: Collection[str] = ()) -> list[str]:
    """The activation tensors of the main graph (see the module docstring), inputs first, then in graph order;
    ``weights`` names graph inputs that are weights (a :func:`~lpbq_tvm.onnx_model.skeleton`'s).

    Element types come from ONNX shape inference; a tensor it cannot type is an error."""
    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    types = {info.name: info.type.tensor_type.elem_type for info in [*inferred.input, *inferred.value_info]}
    types |= {info.name: info.type.tensor_type.elem_type for info in inferred.output}
    initializers = {init.name for init in graph.initializer} | set(weights)
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    names = [info.name for info in graph.input if info.name not in initializers]
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue
        for output in (name for name in node.output if name in read):
            if not types.get(output):
                msg = f"{_node_name(node, index)} ({node.op_type}): shape inference gives no type for output {output!r}"
                raise ValueError(msg)
            names.append(output)
    return [name for name in names if types[name] == TensorProto.FLOAT]
