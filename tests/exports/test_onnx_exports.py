"""ONNX exports: structure of the QNN LPBQ pattern, onnxruntime runs, agreement with the simulations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export_onnx
from lpbq_tvm.exports.qnn_onnx import export_qnn_onnx


def _calibrated(model, data, **kwargs):
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, **kwargs)
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], data)
    return sim


@pytest.fixture(scope="module")
def example_sim():
    data = [{"x": np.random.default_rng(seed).standard_normal((1, 64, 8, 8)).astype(np.float32)} for seed in range(4)]
    return _calibrated(build_example_model(), data), data


def _gemm_with_bias():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
        [
            numpy_helper.from_array(rng.standard_normal((48, 128)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_qnn_pattern_node_by_node_for_a_gemm_with_bias():
    data = [{"x": np.random.default_rng(seed).standard_normal((2, 128)).astype(np.float32)} for seed in range(3)]
    sim = _calibrated(_gemm_with_bias(), data, block_size=32)
    exported = export_qnn_onnx(sim.model, sim.encodings, sim.layer_activation_encodings(16))
    graph = exported.graph
    assert next(o.version for o in exported.opset_import if o.domain == "") == 21
    assert not [n for n in graph.node if n.op_type == "Constant"]  # the fp32 bias constant is gone
    nodes = list(graph.node)
    assert [n.op_type for n in nodes] == [
        "QuantizeLinear",
        "DequantizeLinear",  # input
        "DequantizeLinear",
        "DequantizeLinear",
        "MatMul",  # k -> block scale; q -> weight; MatMul (Gemm rewritten)
        "QuantizeLinear",
        "DequantizeLinear",  # product before the bias
        "DequantizeLinear",
        "Add",  # INT32 bias
        "QuantizeLinear",
        "DequantizeLinear",  # output
    ]
    inits = {i.name: i for i in graph.initializer}
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in nodes}
    scale_dq, weight_dq = nodes[2], nodes[3]
    k, s, zk = (inits[name] for name in scale_dq.input)
    assert (k.data_type, list(k.dims)) == (TensorProto.UINT8, [4, 48])
    assert numpy_helper.to_array(k).min() >= 1 and numpy_helper.to_array(k).max() <= 16
    assert (s.data_type, list(s.dims)) == (TensorProto.FLOAT, [48])
    assert (zk.data_type, list(zk.dims)) == (TensorProto.UINT8, [48]) and not numpy_helper.to_array(zk).any()
    assert attrs[scale_dq.name] == {"axis": 1}
    q, block_scale, zq = weight_dq.input
    assert (inits[q].data_type, list(inits[q].dims)) == (TensorProto.INT4, [128, 48])
    assert block_scale == scale_dq.output[0]
    assert (inits[zq].data_type, list(inits[zq].dims)) == (TensorProto.INT4, [4, 48])
    assert attrs[weight_dq.name] == {"axis": 0, "block_size": 32}
    assert nodes[4].input[1] == weight_dq.output[0]
    assert nodes[5].input[0] == nodes[4].output[0]  # MatMul output straight into Q
    bias_dq = nodes[7]  # per-tensor UINT16: the QNN EP rejects a standalone per-channel (INT32) DQ
    assert inits[bias_dq.input[0]].data_type == TensorProto.UINT16 and attrs[bias_dq.name] == {}
    assert list(inits[bias_dq.input[1]].dims) == [] and inits[bias_dq.input[2]].data_type == TensorProto.UINT16
    for q_node in (nodes[0], nodes[5], nodes[9]):
        assert inits[q_node.input[2]].data_type == TensorProto.UINT16
    assert nodes[-1].output[0] == "y"
    decoded = numpy_helper.to_array(inits[q]).astype(np.int32)
    np.testing.assert_array_equal(decoded, sim.encodings["w"].int_weight.T)


@pytest.mark.parametrize("bits", [8, 16])
def test_qnn_export_agrees_with_htp_sim(example_sim, tmp_path, bits):
    """The written file, run by onnxruntime CPU, gives output codes within the LSB tolerance of htp-sim."""
    sim, data = example_sim
    report = export_onnx(sim, tmp_path / "model.onnx", "qnn", activation_bitwidth=bits, sample_inputs=data[1])
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"), full_check=True)
    from lpbq_tvm.exports._onnx_graph import session

    exported = session(onnx.load(tmp_path / "model.onnx"))
    encoding = sim.layer_activation_encodings(bits)["fc2.weight"]["output"]
    for batch in data:
        ort_codes = encoding.quantize(exported.run(None, batch)[0]).astype(int)
        sim_codes = encoding.quantize(lpbq_tvm.compile(sim, target="htp-sim", mode=f"w4a{bits}").run(batch)["y"])
        assert np.abs(ort_codes - sim_codes).max() <= {8: 2, 16: 1}[bits]
    assert report.checks["y"].startswith("max ") and report.bytes == (tmp_path / "model.onnx").stat().st_size


def test_ort_export_fuses_to_matmulnbits_and_reimports(example_sim, tmp_path):
    sim, data = example_sim
    report = export_onnx(sim, tmp_path / "ort.onnx", "ort", sample_inputs=data[0])
    assert report.checks["onnxruntime"].startswith("2 MatMulNBits")
    with pytest.raises(FileExistsError):
        export_onnx(sim, tmp_path / "ort.onnx", "ort")
    # A user can chain tools: the export imports back, and re-quantizing its weights changes nothing.
    again = QuantizationSimModel(tmp_path / "ort.onnx")
    set_grouped_blockwise_quantization_for_weights(again)
    again.compute_encodings()
    for row in again.report():
        assert row.status == "lpbq" and row.sqnr_db > 100
    np.testing.assert_allclose(
        lpbq_tvm.compile(again).run(data[0])["y"],
        sim.run(data[0])["y"],
        rtol=0,
        atol=1e-4 * np.abs(sim.run(data[0])["y"]).max(),
    )


def test_qnn_export_needs_calibration(tmp_path):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings()
    with pytest.raises(ValueError, match="the QNN export quantizes activations: calibrate"):
        export_onnx(sim, tmp_path / "m.onnx", "qnn")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("trans_b", [1, 0])
def test_matmulnbits_written_directly(tmp_path, trans_b):
    """ "ort-nbits": MatMulNBits nodes in onnxruntime's documented layout, read back by hand (B holds
    q + 8, low nibble first along K; scales k·s), the model's own opset kept, outputs equal to the
    weight-only simulation (the export's validation)."""
    model = _gemm_with_bias()
    if not trans_b:
        weight = numpy_helper.to_array(model.graph.initializer[0])
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), "w"))
        del model.graph.node[0].attribute[:]
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=32)
    sim.compute_encodings()
    report = export_onnx(sim, tmp_path / "fc.onnx", "ort-nbits")
    assert report.checks["onnxruntime"].startswith("1 MatMulNBits")
    exported = onnx.load(tmp_path / "fc.onnx")
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 17), ("com.microsoft", 1)}
    node = next(n for n in exported.graph.node if n.op_type == "MatMulNBits")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"K": 128, "N": 48, "bits": 4, "block_size": 32, "accuracy_level": 0}
    inits = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]]
    assert packed.shape == (48, 4, 16) and packed.dtype == np.uint8 and scales.shape == (48, 4)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(48, 128).astype(np.int32) - 8
    encoding = sim.encodings["w"]
    np.testing.assert_array_equal(codes, encoding.canonical_int_weight())
    np.testing.assert_array_equal(scales, encoding.lpbq_scale.astype(np.float32))

    bad = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(bad, block_size=8)
    bad.compute_encodings()
    with pytest.raises(ValueError, match="fc: MatMulNBits needs a power-of-two block size >= 16, got 8"):
        export_onnx(bad, tmp_path / "bad.onnx", "ort-nbits")
    assert not (tmp_path / "bad.onnx").exists()
