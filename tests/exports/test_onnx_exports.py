"""ONNX exports: structure of the QNN LPBQ pattern, onnxruntime runs, agreement with the simulations."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import pytest
from ir import relax_calls
from model_builders import gated_softmax_model
from onnx import TensorProto, helper, numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.compiler import lower
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import LSB_TOLERANCE, export
from lpbq_tvm.exports._onnx_graph import session
from lpbq_tvm.exports.qnn_check import check_qnn
from lpbq_tvm.exports.qnn_onnx import export_qnn_onnx, quantize_activations


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


@pytest.mark.parametrize(("bits", "everything", "tolerance"), [(8, True, 2), (16, True, 2), (16, False, 1)])
def test_qnn_export_agrees_with_htp_sim(example_sim, tmp_path, bits, everything, tolerance):
    """The written file, run by onnxruntime CPU, gives output codes within the LSB tolerance of htp-sim.
    With every activation quantized there are more rounding points: a 1-LSB difference in the conv's
    output (float conv vs integer kernel) reaches the output as 2 uint16 LSB through ReLU outputs of
    finer scale; with only the LPBQ layers' inputs and outputs it stays within 1."""
    sim, data = example_sim
    path = tmp_path / "model.onnx"
    report = export(
        sim, path, "qnn-onnx", activation_bitwidth=bits, quantize_all_activations=everything, sample_inputs=data[1]
    )
    onnx.checker.check_model(onnx.load(path), full_check=True)
    exported = session(onnx.load(path), optimize=False)
    simulated = lpbq_tvm.compile(sim, "htp-sim", f"w4a{bits}", quantize_all_activations=everything)
    encoding = sim.layer_activation_encodings(bits)["fc2.weight"]["output"]
    for batch in data:
        ort_codes = encoding.quantize(exported.run(None, batch)[0]).astype(int)
        sim_codes = encoding.quantize(simulated.run(batch)["y"])
        assert np.abs(ort_codes - sim_codes).max() <= tolerance
    assert report.checks["y"].startswith("max ") and report.bytes == path.stat().st_size


@pytest.fixture(scope="module")
def gated_sim():
    data = [{"x": np.random.default_rng(seed).standard_normal((1, 8, 64)).astype(np.float32)} for seed in range(3)]
    return _calibrated(gated_softmax_model(), data), data


def _qdq_pairs(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Q -> DQ pairs by the tensor they quantize: the graph input the Q reads, or the node output the
    DQ writes in its place. A second pair for one tensor fails."""
    producers = {output: node for node in graph.node for output in node.output}
    inputs = {info.name for info in graph.input}
    pairs = {}
    for dq in graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            tensor = q.input[0] if q.input[0] in inputs else dq.output[0]
            assert tensor not in pairs, f"two Q/DQ pairs for {tensor!r}"
            pairs[tensor] = (q, dq)
    return pairs


def test_qnn_export_puts_one_qdq_pair_on_every_float_activation(gated_sim):
    """Each float activation goes through exactly one Q -> DQ with its calibrated uint16 encoding and is
    read only through it; the bool gate and the int64 label stay as they were; the LPBQ MatMuls keep
    the pattern of docs/design.md §5 (the pre-flight check passes)."""
    sim, _ = gated_sim
    encodings = sim.tensor_activation_encodings(16)
    exported = export_qnn_onnx(sim.model, sim.encodings, sim.layer_activation_encodings(16), encodings)
    graph = exported.graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    pairs = _qdq_pairs(graph)
    assert list(pairs) == ["x", "h", "gated", "probs", "y"]
    for tensor, (q, dq) in pairs.items():
        assert readers[q.input[0]] == [q]  # the float value is read by its quantizer only
        assert dq.input[1:] == q.input[1:]
        scale, zero_point = inits[q.input[1]], inits[q.input[2]]
        assert scale.item() == encodings[tensor].scale and scale.dtype == np.float32
        assert zero_point.item() == encodings[tensor].zero_point and zero_point.dtype == np.uint16
    assert producers[pairs["h"][0].input[0]].name == "fc1/matmul"  # the LPBQ MatMul writes straight into Q
    assert producers[pairs["gated"][0].input[0]].op_type == "Where"
    assert producers["positive"].op_type == "Greater" and [n.op_type for n in readers["positive"]] == ["Where"]
    assert producers["label"].op_type == "ArgMax" and readers["y"] == [producers["label"]]
    assert check_qnn(exported) == []
    lpbq_only = _qdq_pairs(export_qnn_onnx(sim.model, sim.encodings, sim.layer_activation_encodings(16)).graph)
    assert list(lpbq_only) == ["x", "h", "probs", "y"]  # the inputs and outputs of fc1 and fc2


@pytest.mark.parametrize(("bits", "everything"), [(8, True), (16, True), (16, False)])
def test_htp_sim_compiles_the_graph_the_qnn_export_writes(gated_sim, tmp_path, bits, everything):
    """htp-sim quantizes what the export quantizes (one relax quantize per Q -> DQ pair; the LPBQ
    kernels requantize inside their own calls), and onnxruntime CPU runs the written file within
    LSB_TOLERANCE of it on every batch."""
    sim, data = gated_sim
    path = tmp_path / "model.onnx"
    options = {"activation_bitwidth": bits, "quantize_all_activations": everything}
    export(sim, path, "qnn-onnx", sample_inputs=data[0], **options)
    exported = onnx.load(path)
    lowered = lower(sim, "htp-sim", f"w4a{bits}", quantize_all_activations=everything)
    assert len(relax_calls(lowered, "relax.quantize")) == len(_qdq_pairs(exported.graph)) == (5 if everything else 4)
    simulated = lpbq_tvm.compile(sim, "htp-sim", f"w4a{bits}", quantize_all_activations=everything)
    ort_session = session(exported, optimize=False)
    encoding = sim.tensor_activation_encodings(bits)["y"]
    for batch in data:
        ort_codes = encoding.quantize(ort_session.run(["y"], batch)[0]).astype(int)
        assert np.abs(ort_codes - encoding.quantize(simulated.run(batch)["y"])).max() <= LSB_TOLERANCE[bits]


def test_quantize_activations_refuses_conflicts_and_unknown_tensors(gated_sim):
    """A tensor has one encoding: a layer's input encoded differently as a tensor is refused, as is a
    tensor the graph does not have."""
    sim, _ = gated_sim
    layers = sim.layer_activation_encodings(8)
    with pytest.raises(
        ValueError, match=r"fc1: input 'x' is encoded as .*bitwidth=16.* as a tensor, .*bitwidth=8.* as a layer"
    ):
        quantize_activations(sim.model, layers, sim.tensor_activation_encodings(16))
    with pytest.raises(ValueError, match="no graph input or node output named 'nowhere' to quantize"):
        quantize_activations(sim.model, layers, {"nowhere": layers["w1"]["input"]})
    with pytest.raises(ValueError, match="quantize_all_activations=False selects an htp-sim graph; target 'cpu'"):
        lower(sim, "cpu", "w4a8", quantize_all_activations=False)


def test_ort_export_fuses_to_matmulnbits_and_reimports(example_sim, tmp_path):
    sim, data = example_sim
    report = export(sim, tmp_path / "ort.onnx", "ort-onnx", sample_inputs=data[0])
    assert report.checks["onnxruntime"].startswith("2 MatMulNBits")
    with pytest.raises(FileExistsError):
        export(sim, tmp_path / "ort.onnx", "ort-onnx")
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
        export(sim, tmp_path / "m.onnx", "qnn-onnx")
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
    report = export(sim, tmp_path / "fc.onnx", "ort-nbits-onnx")
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
        export(bad, tmp_path / "bad.onnx", "ort-nbits-onnx")
    assert not (tmp_path / "bad.onnx").exists()
