"""AIMET encodings files: golden entries through a whole model, both versions, fallbacks, read-back."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from model_builders import gated_softmax_model, minmax_encodings
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.calibration import activation_encoding
from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export
from lpbq_tvm.exports.aimet_json import activation_entry, param_entry, per_channel_int8_entry, read_encodings_file


def test_golden_aimet_entries(golden_case, load_golden):
    """AIMET param entries 1.0.0 and 2.0.0 equal aimet_onnx's, field for field (or its refusal)."""
    meta, expected = load_golden(golden_case)
    settings = ("bitwidth", "decompressed_bw", "block_size", "block_grouping")
    encoding = encode_lpbq(
        expected["weight"], meta["channel_axis"], meta["block_axis"], **{k: meta[k] for k in settings}
    )
    name = f"{golden_case}.weight"
    assert param_entry(name, encoding) == meta["encoding_1.0.0"]
    reference_v2 = meta["encoding_2.0.0"]
    if "error" in reference_v2:
        assert "decompressed_bitwidth != 2 * bitwidth" in reference_v2["error"]
        with pytest.raises(ValueError, match=r"decompressed_bw 6 != 2 \* bitwidth 4 .* 2\.0\.0"):
            param_entry(name, encoding, "2.0.0")
    else:
        assert param_entry(name, encoding, "2.0.0") == reference_v2


def test_activation_entries():
    encoding = activation_encoding(-1.0, 3.0, 8)
    assert activation_entry("t", encoding) == {
        "name": "t",
        "dtype": "INT",
        "enc_type": "PER_TENSOR",
        "bw": 8,
        "is_sym": False,
        "scale": [encoding.scale],
        "offset": [-64],
    }
    assert activation_entry("t", encoding, "2.0.0") == {
        "name": "t",
        "output_dtype": "uint8",
        "y_scale": encoding.scale,
        "y_zero_point": 64,
    }
    assert "y_zero_point" not in activation_entry("t", activation_encoding(0.0, 1.0, 8), "2.0.0")


def _golden_model(case: str, meta: dict, weight: np.ndarray):
    """A one-layer model whose weight (named like the golden entry) has the golden layout."""
    name = f"{case}.weight"
    if meta["op"] == "conv":
        node = helper.make_node("Conv", ["x", name], ["y"], name="layer", kernel_shape=list(weight.shape[2:]))
        x_shape = [1, weight.shape[1], 5, 5]
    elif meta["op"] == "gemm":
        trans_b = int(meta["channel_axis"] == 0)
        node = helper.make_node("Gemm", ["x", name], ["y"], name="layer", transB=trans_b)
        x_shape = [2, weight.shape[1] if trans_b else weight.shape[0]]
    else:
        node = helper.make_node("MatMul", ["x", name], ["y"], name="layer")
        x_shape = [2, weight.shape[0]]
    graph = helper.make_graph(
        [node],
        case,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, name)],
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_golden_entries_through_a_model(golden_case, load_golden, tmp_path):
    """The exported file's entry for a golden weight equals aimet_onnx's, in both versions (or its refusal)."""
    meta, arrays = load_golden(golden_case)
    sim = QuantizationSimModel(_golden_model(golden_case, meta, arrays["weight"]))
    set_grouped_blockwise_quantization_for_weights(
        sim,
        bitwidth=meta["bitwidth"],
        decompressed_bw=meta["decompressed_bw"],
        block_size=meta["block_size"],
        block_grouping=meta["block_grouping"],
    )
    sim.compute_encodings()
    name = f"{golden_case}.weight"
    export(sim, tmp_path / "v1.encodings", "aimet-json")
    assert read_encodings_file(tmp_path / "v1.encodings")[name] == meta["encoding_1.0.0"]
    if "error" in meta["encoding_2.0.0"]:
        with pytest.raises(ValueError, match=r"cannot be exported to the 2\.0\.0 encoding format"):
            export(sim, tmp_path / "v2.encodings", "aimet-json", encoding_version="2.0.0")
        assert not (tmp_path / "v2.encodings").exists()
    else:
        export(sim, tmp_path / "v2.encodings", "aimet-json", encoding_version="2.0.0")
        assert read_encodings_file(tmp_path / "v2.encodings")[name] == meta["encoding_2.0.0"]


@pytest.fixture(scope="module")
def calibrated_sim():
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    set_grouped_blockwise_quantization_for_weights(sim, op_types=["MatMul"], excluded_nodes=["fc2"])
    data = [np.random.default_rng(seed).standard_normal((1, 64, 8, 8)).astype(np.float32) for seed in range(2)]
    sim.compute_encodings(lambda s, batches: [s.run({"x": x}) for x in batches], data)
    return sim


def test_version_1_file_layout(calibrated_sim, tmp_path):
    export(calibrated_sim, tmp_path / "model.encodings", "aimet-json")
    data = json.loads((tmp_path / "model.encodings").read_text())
    assert list(data) == ["version", "activation_encodings", "param_encodings", "excluded_layers", "quantizer_args"]
    params = {entry["name"]: entry for entry in data["param_encodings"]}
    assert params["conv.weight"]["enc_type"] == "LPBQ" and params["fc1.weight"]["enc_type"] == "LPBQ"
    fallback = params["fc2.weight"]  # excluded from LPBQ: 8-bit per channel, as AIMET keeps it
    weight = numpy_helper.to_array(next(i for i in calibrated_sim.model.graph.initializer if i.name == "fc2.weight"))
    assert fallback == per_channel_int8_entry("fc2.weight", weight, 1)
    np.testing.assert_allclose(fallback["scale"], np.abs(weight).max(axis=0) / 127)
    activation = {entry["name"]: entry for entry in data["activation_encodings"]}["x"]
    assert set(activation) == {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset"}
    assert len(activation["scale"]) == len(activation["offset"]) == 1 and activation["offset"][0] <= 0


def test_version_2_file_layout(calibrated_sim, tmp_path):
    report = export(calibrated_sim, tmp_path / "model.encodings", "aimet-json", encoding_version="2.0.0")
    assert "int32 bias encodings" in report.checks["note"] and "fc1" in report.checks["note"]  # the QNN trap
    assert (
        "note" not in export(calibrated_sim, tmp_path / "v1.encodings", "aimet-json", encoding_version="1.0.0").checks
    )
    data = json.loads((tmp_path / "model.encodings").read_text())
    assert list(data) == ["version", "encodings"] and data["version"] == "2.0.0"
    entries = {entry["name"]: entry for entry in data["encodings"]}
    assert np.asarray(entries["conv.weight"]["per_block_int_scale"]).shape == (128, 1, 1, 1)
    assert entries["conv.weight"]["axis"] == 1 and entries["conv.weight"]["output_dtype"] == "int4"
    assert entries["fc2.weight"]["output_dtype"] == "int8" and entries["fc2.weight"]["axis"] == 1
    relu = entries["flat"]  # pooled ReLU output: range [0, max] -> zero point 0, omitted
    assert relu["output_dtype"] == "uint8" and "y_zero_point" not in relu
    assert entries["x"]["y_zero_point"] > 0


def test_no_overwrite_and_dead_channels_are_reported(tmp_path):
    model = build_example_model()
    weight = numpy_helper.to_array(model.graph.initializer[2]).copy()  # fc1.weight [256, 128]
    weight[[3, 7]] = 0.0
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(weight, "fc1.weight"))
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings()
    assert {row.node: row.dead_channels for row in sim.report()} == {"conv": 0, "fc1": 2, "fc2": 0}
    scale = sim.encodings["fc1.weight"].per_channel_scale
    assert scale[3] == scale[7] == scale.min() == 1.1920928955078125e-07 / 16  # AIMET's minimum scale
    export(sim, tmp_path / "a.encodings", "aimet-json")
    with pytest.raises(FileExistsError):
        export(sim, tmp_path / "a.encodings", "aimet-json")


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_every_calibrated_activation_is_listed(version, tmp_path):
    """Every float activation by its ONNX tensor name, with the scale and (QNN-style) offset of its
    calibrated range, in graph order; the weights are the only other entries."""
    batches = [{"x": np.random.default_rng(seed).standard_normal((1, 8, 64)).astype(np.float32)} for seed in range(3)]
    sim = QuantizationSimModel(gated_softmax_model(), default_activation_bw=16)
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    export(sim, tmp_path / "model.encodings", "aimet-json", encoding_version=version)
    data = json.loads((tmp_path / "model.encodings").read_text())
    if version == "1.0.0":
        assert {entry["bw"] for entry in data["activation_encodings"]} == {16}
        listed = {entry["name"]: (entry["scale"], entry["offset"]) for entry in data["activation_encodings"]}
        param_names = [entry["name"] for entry in data["param_encodings"]]
    else:
        activations = [entry for entry in data["encodings"] if entry["name"] not in sim.encodings]
        assert {entry["output_dtype"] for entry in activations} == {"uint16"}
        listed = {entry["name"]: ([entry["y_scale"]], [-entry.get("y_zero_point", 0)]) for entry in activations}
        param_names = [entry["name"] for entry in data["encodings"] if entry["name"] in sim.encodings]
    names = ["x", "h", "gated", "probs", "y"]
    expected = minmax_encodings(sim, batches, names, 16)
    assert listed == {name: ([expected[name].scale], [expected[name].offset]) for name in names}
    assert list(listed) == names and sorted(param_names) == ["w1", "w2"]
