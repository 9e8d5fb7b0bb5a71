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


def check_qnn(model: onnx.ModelProto) -> list[Finding]:
    """Every problem of ``model`` for the QNN LPBQ path; an empty list means none was found."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    findings = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 21:
        findings.append(Finding("<model>", f"opset {opset} < 21", "export with opset 21 (lpbq-tvm does)"))

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    for node in graph.node:
        if node.op_type != "DequantizeLinear" or "block_size" not in _attributes(node):
            continue
        name = node.name or node.output[0]
        block_size = _attributes(node)["block_size"]
        codes = initializers.get(node.input[0])
        if codes is None or codes.data_type != TensorProto.INT4:
            findings.append(
                Finding(
                    name, "blocked weight codes are not a constant INT4 tensor", "store q as INT4 (symmetric, -8..7)"
                )
            )
        elif codes.dims[0] % block_size:
            findings.append(
                Finding(
                    name,
                    f"block size {block_size} does not divide the {codes.dims[0]} input channels",
                    "choose a block size that divides every LPBQ layer's input channels",
                )
            )
        zero = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or initializers[node.input[2]].data_type != TensorProto.INT4 or zero.any():
            findings.append(
                Finding(
                    name,
                    "missing or non-zero INT4 zero point",
                    "add an all-zero INT4 zero point shaped like the block scale",
                )
            )
        scale_node = producers.get(node.input[1])
        if scale_node is None or scale_node.op_type != "DequantizeLinear":
            findings.append(
                Finding(
                    name,
                    "the block scale is a float tensor, not k · s",
                    "write it as DequantizeLinear(k: UINT8, s: FLOAT, 0, axis=1) (LPBQ)",
                )
            )
        else:
            k = initializers.get(scale_node.input[0])
            if k is None or k.data_type != TensorProto.UINT8:
                findings.append(Finding(name, "the per-block integer scale k is not UINT8", "store k as UINT8"))
            elif not (numpy_helper.to_array(k).min() >= 1 and numpy_helper.to_array(k).max() <= 16):
                findings.append(
                    Finding(
                        name,
                        "k outside 1..16 (the runtime does not check it)",
                        "re-encode with decompressed_bw = 2 * bitwidth",
                    )
                )
        for consumer in consumers.get(node.output[0], []):
            cname = consumer.name or consumer.output[0]
            if consumer.op_type == "Gemm":
                findings.append(
                    Finding(
                        cname,
                        "LPBQ weight feeds a Gemm: QNN's Gemm fusion drops the bias and misreads transB=0",
                        "rewrite as MatMul + Add (lpbq-tvm's export does)",
                    )
                )
            elif consumer.op_type == "Conv":
                activation = producers.get(consumer.input[0])
                zero = constant(activation.input[2]) if activation is not None and len(activation.input) > 2 else None
                wide = (
                    activation is not None
                    and activation.op_type == "DequantizeLinear"
                    and (zero is not None and zero.dtype == np.uint16)
                )
                one_by_one = codes is not None and all(d == 1 for d in codes.dims[2:])
                if not (one_by_one and wide):
                    findings.append(
                        Finding(
                            cname,
                            "LPBQ Conv runs on the HTP only as 1x1 with uint16 activations",
                            "export the Conv as int8 per channel (lpbq-tvm's default)",
                        )
                    )
            elif consumer.op_type == "MatMul":
                findings += _check_matmul(consumer, producers, consumers, initializers)
    return findings


def _check_matmul(node, producers, consumers, initializers) -> list[Finding]:
    name = node.name or node.output[0]
    findings = []
    activation = producers.get(node.input[0])
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
