"""Pre-flight check of a QDQ ONNX model for Qualcomm's QNN toolchain: LPBQ problems per node, with the fix.

Finds, before a user meets an opaque converter or runtime failure (docs/design.md §5):

* opset below 21 (blocked ``DequantizeLinear`` and INT4 need it);
* a blocked weight ``DequantizeLinear`` whose codes are not symmetric INT4 with all-zero INT4
  zero points, whose block size does not divide the input channels, or whose per-block scale is
  not ``DequantizeLinear(k: UINT8 in 1..16, s: FLOAT, 0, axis=1)`` (the LPBQ form);
* an LPBQ weight feeding a Gemm (the QNN Gemm fusion drops the bias and misreads transB=0), or a
  Conv that is not 1x1 with uint16 activations (the only LPBQ Conv the HTP runs);
* an LPBQ MatMul whose activation is not quantized (uint8/uint16 DQ) or whose output does not go
  straight into a ``QuantizeLinear``;
* a bias added to an LPBQ layer's output that is float, or a per-channel ``DequantizeLinear``
  (the QNN EP rejects standalone per-channel DQ and INT32 per-tensor DQ; per-tensor uint16 works).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Finding", "check_qnn"]


@dataclass(frozen=True)
class Finding:
    node: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.node}: {self.problem} (fix: {self.fix})"


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Who produces and who reads each tensor of a graph, and its initializers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.initializers[name]) if name in self.initializers else None


def check_qnn(model: onnx.ModelProto) -> list[Finding]:
    """Every problem of ``model`` for the QNN LPBQ path; an empty list means none was found."""
    graph = _Graph(model.graph)
    findings = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:
        findings.append(Finding("<model>", f"opset {opset} < 21", "export with opset 21 (lpbq-tvm does)"))
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and "block_size" in _attributes(node):
            findings += _check_blocked_weight(node, graph)
            for consumer in graph.consumers.get(node.output[0], []):
                findings += _check_consumer(consumer, graph, graph.initializers.get(node.input[0]))
    return findings


def _check_blocked_weight(node: onnx.NodeProto, graph: _Graph) -> list[Finding]:
    """The codes, zero point and block scale of a blocked weight ``DequantizeLinear``."""
    name, block_size = node.name or node.output[0], _attributes(node)["block_size"]
    findings = []
    codes = graph.initializers.get(node.input[0])
    if codes is None or codes.data_type != TensorProto.INT4:
        fix = "store q as INT4 (symmetric, -8..7)"
        findings.append(Finding(name, "blocked weight codes are not a constant INT4 tensor", fix))
    elif codes.dims[0] % block_size:
        problem = f"block size {block_size} does not divide the {codes.dims[0]} input channels"
        findings.append(Finding(name, problem, "choose a block size that divides every LPBQ layer's input channels"))
    zero = graph.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is None or graph.initializers[node.input[2]].data_type != TensorProto.INT4 or zero.any():
        fix = "add an all-zero INT4 zero point shaped like the block scale"
        findings.append(Finding(name, "missing or non-zero INT4 zero point", fix))
    scale_node = graph.producers.get(node.input[1])
    if scale_node is None or scale_node.op_type != "DequantizeLinear":
        fix = "write it as DequantizeLinear(k: UINT8, s: FLOAT, 0, axis=1) (LPBQ)"
        findings.append(Finding(name, "the block scale is a float tensor, not k · s", fix))
        return findings
    k = graph.initializers.get(scale_node.input[0])
    if k is None or k.data_type != TensorProto.UINT8:
        findings.append(Finding(name, "the per-block integer scale k is not UINT8", "store k as UINT8"))
    elif not (numpy_helper.to_array(k).min() >= 1 and numpy_helper.to_array(k).max() <= 16):
        fix = "re-encode with decompressed_bw = 2 * bitwidth"
        findings.append(Finding(name, "k outside 1..16 (the runtime does not check it)", fix))
    return findings


def _check_consumer(consumer: onnx.NodeProto, graph: _Graph, codes) -> list[Finding]:
    """The layer an LPBQ weight feeds: no Gemm, a Conv only as the HTP runs it, a MatMul quantized around."""
    name = consumer.name or consumer.output[0]
    if consumer.op_type == "Gemm":
        problem = "LPBQ weight feeds a Gemm: QNN's Gemm fusion drops the bias and misreads transB=0"
        return [Finding(name, problem, "rewrite as MatMul + Add (lpbq-tvm's export does)")]
    if consumer.op_type == "Conv":
        activation = graph.producers.get(consumer.input[0])
        zero = graph.constant(activation.input[2]) if activation is not None and len(activation.input) > 2 else None
        wide = activation is not None and activation.op_type == "DequantizeLinear"
        wide = wide and zero is not None and zero.dtype == np.uint16
        one_by_one = codes is not None and all(d == 1 for d in codes.dims[2:])
        if one_by_one and wide:
            return []
        problem = "LPBQ Conv runs on the HTP only as 1x1 with uint16 activations"
        return [Finding(name, problem, "export the Conv as int8 per channel (lpbq-tvm's default)")]
    if consumer.op_type == "MatMul":
        return _check_matmul(consumer, graph)
    return []


def _check_matmul(node: onnx.NodeProto, graph: _Graph) -> list[Finding]:
    name = node.name or node.output[0]
    findings = []
    initializers, consumers = graph.initializers, graph.consumers
    activation = graph.producers.get(node.input[0])
    if activation is None or activation.op_type != "DequantizeLinear":
        findings.append(
            Finding(
                name,
                "the activation of an LPBQ MatMul is not quantized",
                "put QuantizeLinear -> DequantizeLinear (uint8 or uint16) before it",
            )
        )
    elif (
        len(activation.input) > 2
        and activation.input[2] in initializers
        and initializers[activation.input[2]].data_type not in (TensorProto.UINT8, TensorProto.UINT16)
    ):
        findings.append(Finding(name, "activation zero point is neither uint8 nor uint16", "use uint8 or uint16"))
    after = consumers.get(node.output[0], [])
    if [n.op_type for n in after] != ["QuantizeLinear"]:
        findings.append(
            Finding(
                name,
                "the MatMul output does not go straight into one QuantizeLinear",
                "quantize the MatMul output before any Add (MatMul -> Q -> DQ -> Add(DQ(bias)))",
            )
        )
    else:
        dequantized = consumers.get(after[0].output[0], [])
        for add in (n for d in dequantized for n in consumers.get(d.output[0], []) if n.op_type == "Add"):
            for bias in add.input:
                if bias in initializers and initializers[bias].data_type == TensorProto.FLOAT:
                    findings.append(
                        Finding(
                            add.name or add.output[0],
                            "float bias after an LPBQ MatMul",
                            "quantize the bias to INT32 with scale sx · s (DequantizeLinear)",
                        )
                    )
    return findings
