"""The AIMET-style workflow end to end on the built-in example model, compiled with TVM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_builders import (
    assert_float_close,
    computed_in_graph,
    gated_softmax_model,
    minmax_encodings,
    ort_run,
    simulation_bound,
    with_weight,
)
from onnx import numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export
from lpbq_tvm.exports.aimet_json import param_entry
from lpbq_tvm.packing import packed_nbytes


@pytest.fixture(scope="module")
def example_input():
    return {"x": np.random.default_rng(7).standard_normal((1, 64, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def encoded_sim():
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(
        sim, op_types=("Gemm", "MatMul", "Conv"), bitwidth=4, decompressed_bw=8, block_size=64
    )
    sim.compute_encodings()
    return sim


def test_sim_run_is_the_model_with_dequantized_weights(encoded_sim, example_input):
    """sim.run equals onnxruntime on the prepared model with each weight replaced by the encoder's qdq,
    computed in the graph (as AIMET's quantizer nodes compute it), not a constant."""
    model = encoded_sim.model
    for layer in ("conv.weight", "fc1.weight", "fc2.weight"):
        initializer = next(i for i in model.graph.initializer if i.name == layer)
        weight = numpy_helper.to_array(initializer)
        axes = (1, 0) if layer == "fc2.weight" else (0, 1)
        model = computed_in_graph(with_weight(model, layer, encode_lpbq(weight, *axes).qdq_weight), layer)
    np.testing.assert_array_equal(encoded_sim.run(example_input)["y"], ort_run(model, example_input)["y"])


def test_compiled_lpbq_model_matches_simulation(encoded_sim, example_input):
    compiled = lpbq_tvm.compile(encoded_sim, target="cpu", mode="weight-only")
    actual = compiled.run(example_input)["y"]
    reference = encoded_sim.run(example_input)["y"]
    assert_float_close(actual, reference, simulation_bound(encoded_sim, example_input))
    expected = sum(
        packed_nbytes(e.shape, e.channel_axis, e.block_axis, e.block_size) for e in encoded_sim.encodings.values()
    )
    # The tiled layouts of the x86 and aarch64 kernels add the conv's k once per kernel tap (its tap-major
    # im2col columns): at most (taps - 1) nb / 2 bytes per channel, less than 1 / block_size of its q bytes.
    assert expected < compiled.weight_bytes.lpbq_packed <= expected * (1 + 1 / 64)
    assert lpbq_tvm.compile(encoded_sim, target="aarch64").weight_bytes == compiled.weight_bytes
    assert compiled.weight_bytes.float == 0
    float_output = lpbq_tvm.compile(encoded_sim, mode="fp32").run(example_input)["y"]
    assert not np.allclose(float_output, actual, atol=1e-3)  # the compiled model is really quantized


def test_export_library_round_trip(encoded_sim, example_input, tmp_path):
    import tvm
    from tvm import relax

    compiled = lpbq_tvm.compile(encoded_sim)
    path = compiled.export_library(tmp_path / "model.so")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        compiled.export_library(path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    loaded = vm["main"](tvm.runtime.tensor(example_input["x"]), *compiled.params).numpy()
    np.testing.assert_array_equal(loaded, compiled.run(example_input)["y"])


def test_bits_per_weight_of_a_4096_wide_layer():
    """The lowered parameters of a K=4096, B=64 layer take 4.07 bits per weight; no fp32 copy remains."""
    from onnx import TensorProto, helper

    weight = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings()
    compiled = lpbq_tvm.compile(sim)
    assert compiled.weight_bytes.float == 0
    assert compiled.weight_bytes.lpbq_packed == 256 * (2048 + 32 + 4)
    assert round(8 * compiled.weight_bytes.lpbq_packed / weight.size, 2) == 4.07


def test_later_call_wins_for_its_op_types_and_exclusions_are_reported():
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    set_grouped_blockwise_quantization_for_weights(sim, op_types="Conv", block_size=32)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=["MatMul"], block_size=64, excluded_nodes=["fc2"])
    sim.compute_encodings()
    rows = {row.node: row for row in sim.report()}
    assert (rows["conv"].status, rows["conv"].block_size) == ("lpbq", 32)
    assert (rows["fc1"].status, rows["fc1"].block_size) == ("lpbq", 64)
    assert (rows["fc2"].status, rows["fc2"].reason) == ("skipped", "excluded by the user")
    compiled = lpbq_tvm.compile(sim)
    assert compiled.weight_bytes.float == 256 * 64 * 4  # fc2 stays fp32


def test_strict_and_non_strict_for_a_layer_that_cannot_take_the_block_size():
    sim = QuantizationSimModel(build_example_model())
    with pytest.raises(
        ValueError,
        match=r"strict LPBQ: fc1: weight shape \(256, 128\): input-channel length 128 "
        r"along block axis 1 is not divisible by block_size 96",
    ):
        set_grouped_blockwise_quantization_for_weights(sim, op_types=["Gemm"], block_size=96, strict=True)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=128)  # conv has 64 input channels
    sim.compute_encodings()
    rows = {row.node: row for row in sim.report()}
    assert rows["conv"].status == "skipped" and "not divisible by block_size 128" in rows["conv"].reason
    assert rows["fc1"].status == rows["fc2"].status == "lpbq"
    with pytest.raises(ValueError, match=r"block_size 96 fits none of the 3 selected layers"):
        set_grouped_blockwise_quantization_for_weights(sim, block_size=96)


def test_argument_errors():
    sim = QuantizationSimModel(build_example_model())
    with pytest.raises(ValueError, match=r"unknown op type\(s\) Softmax"):
        set_grouped_blockwise_quantization_for_weights(sim, op_types=["Softmax"])
    with pytest.raises(ValueError, match=r"excluded_nodes names 'fc3', which are not Gemm/MatMul/Conv nodes"):
        set_grouped_blockwise_quantization_for_weights(sim, excluded_nodes=["fc3"])
    with pytest.raises(RuntimeError, match=r"call sim.compute_encodings\(\) first"):
        sim.run({"x": np.zeros((1, 64, 8, 8), np.float32)})


def test_compute_encodings_calls_back_with_the_sim(example_input):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    seen = []
    sim.compute_encodings(lambda s, args: seen.append((s, s.run(args)["y"])), example_input)
    assert seen[0][0] is sim and seen[0][1].shape == (1, 64)


def test_export_writes_model_and_aimet_encodings(encoded_sim, tmp_path):
    onnx_path, json_path = encoded_sim.export(tmp_path, "example")
    encodings = json.loads(json_path.read_text())
    assert encodings["version"] == "1.0.0"
    by_name = {entry["name"]: entry for entry in encodings["param_encodings"]}
    assert sorted(by_name) == ["conv.weight", "fc1.weight", "fc2.weight"]
    for name, encoding in encoded_sim.encodings.items():
        assert by_name[name] == param_entry(name, encoding)
    import onnx

    assert {i.name for i in onnx.load(onnx_path).graph.initializer} >= set(by_name)
    with pytest.raises(FileExistsError):
        encoded_sim.export(tmp_path, "example")
    encoded_sim.export(tmp_path, "example", overwrite=True)


@pytest.fixture(scope="module")
def calibration_data():
    return [np.random.default_rng(seed).standard_normal((1, 64, 8, 8)).astype(np.float32) for seed in range(4)]


@pytest.fixture(scope="module")
def calibrated_sim(calibration_data):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings(lambda s, batches: [s.run({"x": x}) for x in batches], calibration_data)
    return sim


def test_calibration_records_the_min_max_of_the_data(calibrated_sim, calibration_data):
    from lpbq_tvm.calibration import activation_encoding

    encodings = calibrated_sim.activation_encodings
    # every float tensor computed from the input, not only the inputs and outputs of the 3 layers
    assert list(encodings) == ["x", "conv_out", "relu1", "pool", "flat", "fc1_out", "relu2", "y"]
    layers = calibrated_sim.layer_activation_encodings(8)
    assert layers["fc1.weight"]["input"] == encodings["flat"] and layers["fc1.weight"]["output"] == encodings["fc1_out"]
    data = np.stack(calibration_data)
    assert encodings["x"] == activation_encoding(data.min(), data.max(), 8)
    outputs = np.stack([calibrated_sim.run({"x": x})["y"] for x in calibration_data])
    assert encodings["y"] == activation_encoding(outputs.min(), outputs.max(), 8)
    entries = {e["name"]: e for e in calibrated_sim.aimet_encodings()["activation_encodings"]}
    assert entries["x"]["scale"] == [encodings["x"].scale] and entries["x"]["offset"] == [encodings["x"].offset]


def test_calibration_observes_every_float_activation_and_nothing_else():
    """The float tensors computed from the input, each with the min/max of its values on the data;
    not the bool gate, the int64 label or the constant. A layer's input and output are those tensors."""
    batches = [{"x": np.random.default_rng(seed).standard_normal((1, 8, 64)).astype(np.float32)} for seed in range(3)]
    sim = QuantizationSimModel(gated_softmax_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    names = ["x", "h", "gated", "probs", "y"]
    encodings = sim.tensor_activation_encodings(16)
    assert encodings == minmax_encodings(sim, batches, names, 16)
    assert list(encodings) == names
    layers = sim.layer_activation_encodings(16)
    assert layers["w1"] == {"input": encodings["x"], "output": encodings["h"]}
    assert layers["w2"] == {"input": encodings["probs"], "output": encodings["y"]}


def test_percentile_scheme_narrows_the_ranges(calibration_data):
    sim = QuantizationSimModel(build_example_model(), quant_scheme="percentile", percentile=99.0)
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings(lambda s, batches: [s.run({"x": x}) for x in batches], calibration_data)
    data = np.stack(calibration_data)
    low, high = np.percentile(data, [1.0, 99.0])
    from lpbq_tvm.calibration import activation_encoding

    assert sim.activation_encodings["x"] == activation_encoding(low, high, 8)
    assert sim.activation_encodings["x"].scale < activation_encoding(data.min(), data.max(), 8).scale


@pytest.mark.parametrize(
    ("target", "mode"), [("cpu", "w4a8"), ("cpu", "w4a16"), ("htp-sim", "w4a8"), ("htp-sim", "w4a16")]
)
def test_integer_modes_compile_and_agree_with_fp32(calibrated_sim, example_input, target, mode):
    quantized = lpbq_tvm.compile(calibrated_sim, target=target, mode=mode).run(example_input)["y"]
    reference = lpbq_tvm.compile(calibrated_sim, mode="fp32").run(example_input)["y"]
    cosine = float(quantized.ravel() @ reference.ravel() / np.linalg.norm(quantized) / np.linalg.norm(reference))
    assert cosine > 0.98, cosine  # W4 weights at 19-20 dB SQNR on 3 layers keep the direction


def test_integer_mode_needs_calibration(encoded_sim):
    with pytest.raises(ValueError, match=r"mode w4a8 quantizes activations and needs their ranges"):
        lpbq_tvm.compile(encoded_sim, mode="w4a8")


def test_target_mode_combinations_are_checked(calibrated_sim):
    with pytest.raises(ValueError, match=r"target 'htp-sim' builds modes w4a8, w4a16 \(and fp32\), not 'weight-only'"):
        lpbq_tvm.compile(calibrated_sim, target="htp-sim", mode="weight-only")
    with pytest.raises(ValueError, match=r"unknown target 'gpu'; known targets: aarch64, aarch64-i8mm, cpu, htp-sim"):
        lpbq_tvm.compile(calibrated_sim, target="gpu")


def test_tensors_no_calibration_data_reached_are_named_in_a_readable_warning(caplog):
    """A decoder calibrated with an empty past leaves its cache inputs unquantized; the warning counts them
    all and names the first few, not a wall of dozens."""
    from onnx import TensorProto, helper

    empties = [f"past.{i}" for i in range(8)]
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", *empties], ["c"], axis=1), helper.make_node("MatMul", ["c", "w"], ["y"])],
        "empties",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4 if n == "x" else 0]) for n in ["x", *empties]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sim = QuantizationSimModel(model, input_shapes={n: [1, 0] for n in empties})
    set_grouped_blockwise_quantization_for_weights(sim, block_size=4)
    inputs = {"x": np.ones((1, 4), np.float32)} | {n: np.zeros((1, 0), np.float32) for n in empties}
    with caplog.at_level("WARNING", logger="lpbq_tvm.quantsim"):
        sim.compute_encodings(lambda s, data: s.run(data), inputs)
    (message,) = [r.getMessage() for r in caplog.records if "calibration data" in r.getMessage()]
    assert message.startswith("no calibration data reached 8 tensors, left unquantized: past.0, past.1,")
    assert message.endswith("past.5, ...") and "past.6" not in message


def _two_matmuls(relu: bool = True, names=("first", "second")):
    """x [4, 64] -> MatMul "first" -> (Relu) -> MatMul "second" [64, 32] -> y, with Gaussian weights; the
    second reads ``h``, the Relu's output (or the first's, without it)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(11)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (64, 64)), ("w2", (64, 32)))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0" if relu else "h"], name=names[0]),
        *([helper.make_node("Relu", ["h0"], ["h"], name="relu")] if relu else []),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name=names[1]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibrated_two_matmuls(sixteen_bit=(), relu: bool = True):
    sim = QuantizationSimModel(_two_matmuls(relu))
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=32)
    sim.set_activation_bitwidth(sixteen_bit, 16)
    batches = [{"x": np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)} for seed in range(3)]
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    return sim


def test_a_layer_with_its_own_activation_width_runs_it_bit_exactly():
    """In w4a8, the second MatMul set to 16 bits quantizes its input to uint16 and the first to uint8:
    the compiled model equals the numpy reference of that mix bit for bit, and differs from all-8-bit."""
    from lpbq_tvm import reference
    from lpbq_tvm.packing import pack, unpack

    mixed = _calibrated_two_matmuls(sixteen_bit=["second"])
    assert mixed.activation_bitwidths == {"second": 16}
    x = {"x": np.random.default_rng(99).standard_normal((4, 64)).astype(np.float32) * 1.5}
    (actual,) = lpbq_tvm.compile(mixed, mode="w4a8").run(x).values()

    def layer(name, inputs, bits):
        q, k, s = unpack(pack(mixed.encodings[name]))
        encoding = mixed.tensor_activation_encodings(bits)[{"w1": "x", "w2": "h"}[name]]
        return reference.dense_int(inputs, reference.int_weight(q, k, 32), s, encoding)

    expected = layer("w2", np.maximum(layer("w1", x["x"], 8), 0), 16)
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))
    (all_8_bit,) = lpbq_tvm.compile(_calibrated_two_matmuls(), mode="w4a8").run(x).values()
    assert not np.array_equal(all_8_bit, actual)


def test_own_activation_widths_are_refused_where_rows_are_encoded_and_for_unknown_layers():
    mixed = _calibrated_two_matmuls(sixteen_bit=["second"])
    with pytest.raises(ValueError, match=r"second: its activations have their own width.*mode w4a8-dynamic cannot"):
        lpbq_tvm.compile(mixed, mode="w4a8-dynamic")
    with pytest.raises(ValueError, match=r"'third' are not LPBQ layers; those are: first, second"):
        mixed.set_activation_bitwidth(["third"], 16)
    with pytest.raises(ValueError, match="12"):
        mixed.set_activation_bitwidth(["first"], 12)


def test_the_qnn_export_and_htp_sim_carry_a_tensor_s_own_width(tmp_path):
    """The QNN export quantizes ``h`` (the second MatMul's input) to uint16 and the rest to uint8, and
    onnxruntime running it agrees with htp-sim, which requantizes the same way (the export's own check);
    the layer encodings agree with the tensor ones."""
    import onnx

    mixed = _calibrated_two_matmuls(sixteen_bit=["second"])
    layers, tensors = mixed.layer_activation_encodings(8), mixed.tensor_activation_encodings(8)
    assert (layers["w1"]["input"], layers["w1"]["output"]) == (tensors["x"], tensors["h0"])
    assert layers["w2"]["input"] == tensors["h"] and tensors["h"].bitwidth == 16 and tensors["h0"].bitwidth == 8
    report = export(mixed, tmp_path / "m.onnx", "qnn-onnx")
    assert "LSB vs htp-sim" in report.checks["y"]
    model = onnx.load(tmp_path / "m.onnx")
    initializers = {init.name: init for init in model.graph.initializer}
    zero_points = {node.output[0].removesuffix("/q"): initializers[node.input[2]].data_type
                   for node in model.graph.node if node.op_type == "QuantizeLinear"}  # fmt: skip
    assert zero_points["h"] == onnx.TensorProto.UINT16
    assert {zero_points[name] for name in ("x", "h0", "y")} == {onnx.TensorProto.UINT8}


@pytest.mark.parametrize("relu", [True, False], ids=["relu-between", "first-writes-h"])
def test_htp_sim_requantizes_a_layer_s_input_at_its_own_width(relu):
    """htp-sim of the mix equals the numpy reference of its Q/DQ chain bit for bit: the second MatMul reads
    ``h`` as uint16 codes; ``h`` is a Relu of the first's uint8-requantized output, or, without the Relu,
    the first's output itself, which it then requantizes to uint16."""
    from lpbq_tvm import reference
    from lpbq_tvm.packing import pack, unpack

    mixed = _calibrated_two_matmuls(sixteen_bit=["second"], relu=relu)
    x = np.random.default_rng(99).standard_normal((4, 64)).astype(np.float32) * 1.5
    (actual,) = lpbq_tvm.compile(mixed, "htp-sim", "w4a8").run({"x": x}).values()
    tensors = mixed.tensor_activation_encodings(8)
    assert tensors["h"].bitwidth == 16

    def layer(name, inputs, source, result):
        q, k, s = unpack(pack(mixed.encodings[name]))
        weight = reference.int_weight(q, k, 32)
        return reference.dense_int(inputs, weight, s, tensors[source], None, tensors[result])

    if relu:
        h = tensors["h"].dequantize(tensors["h"].quantize(np.maximum(layer("w1", x, "x", "h0"), 0)))
    else:
        h = layer("w1", x, "x", "h")
    expected = layer("w2", h, "h", "y")
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def test_own_widths_on_a_graph_of_unnamed_nodes():
    """ONNX nodes may have no name (the importer names them): the layers are found by their weights."""
    sim = QuantizationSimModel(_two_matmuls(names=("", "")))
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=32)
    sim.set_activation_bitwidth(sim.lpbq_nodes[1:], 16)
    batches = [{"x": np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)} for seed in range(3)]
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    assert {name: e.bitwidth for name, e in sim.tensor_activation_encodings(8).items()} == {
        "x": 8,
        "h0": 8,
        "h": 16,
        "y": 8,
    }
