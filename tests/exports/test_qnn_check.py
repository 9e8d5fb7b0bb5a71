"""The QNN pre-flight check: a clean export passes; each known trap is reported on its node with a fix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.exports.qnn_check import check_qnn
from lpbq_tvm.exports.qnn_onnx import export_qnn_onnx


@pytest.fixture(scope="module")
def exported():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [
            numpy_helper.from_array(rng.standard_normal((32, 128)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
        ],
    )
    sim = QuantizationSimModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings(lambda s, x: s.run({"x": x}), rng.standard_normal((2, 128)).astype(np.float32))
    return export_qnn_onnx(sim.model, sim.encodings, sim.layer_activation_encodings(16))


def _copy(model):
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def _node(model, op_type, index=0):
    return [n for n in model.graph.node if n.op_type == op_type][index]


def _initializer(model, name):
    return next(i for i in model.graph.initializer if i.name == name)


def test_clean_export_has_no_findings(exported):
    assert check_qnn(exported) == []


def test_gemm_consumer_is_reported(exported):
    model = _copy(exported)
    _node(model, "MatMul").op_type = "Gemm"
    (finding,) = [f for f in check_qnn(model) if "Gemm" in f.problem]
    assert finding.node == "fc/matmul" and "MatMul + Add" in finding.fix


def test_k_out_of_range_is_reported(exported):
    model = _copy(exported)
    k = _initializer(model, "w.k")
    values = numpy_helper.to_array(k).copy()
    values[0, 0] = 17
    k.CopyFrom(numpy_helper.from_array(values, "w.k"))
    assert [f.problem for f in check_qnn(model)] == ["k outside 1..16 (the runtime does not check it)"]


def test_missing_zero_point_and_float_bias_are_reported(exported):
    model = _copy(exported)
    weight_dq = next(n for n in model.graph.node if n.name == "fc/weight_dq")
    del weight_dq.input[2]
    bias_add = _node(model, "Add")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(32, np.float32), "float_bias"))
    bias_add.input[1] = "float_bias"
    problems = {f.node: f.problem for f in check_qnn(model)}
    assert problems == {
        "fc/weight_dq": "missing or non-zero INT4 zero point",
        "fc/bias": "float bias after an LPBQ MatMul",
    }


def test_low_opset_and_unquantized_activation_are_reported(exported):
    model = _copy(exported)
    next(o for o in model.opset_import if o.domain == "").version = 17
    matmul = _node(model, "MatMul")
    matmul.input[0] = "x"
    problems = [str(f) for f in check_qnn(model)]
    assert problems == [
        "<model>: opset 17 < 21 (fix: export with opset 21 (lpbq-tvm does))",
        "fc/matmul: the activation of an LPBQ MatMul is not quantized (fix: put QuantizeLinear -> DequantizeLinear "
        "(uint8 or uint16) before it)",
    ]
