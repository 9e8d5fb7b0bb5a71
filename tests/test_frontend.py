"""ONNX import: graph preparation, weights as the only parameters, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_builders import LAYER_CASES, layer_model, masked_softmax_model, ort_run
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm.compiler import build
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.frontend import MASK_VALUE, ModelImportError, import_onnx, prepare_onnx


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_example_model_imports_with_only_weights_as_parameters():
    imported = import_onnx(build_example_model())
    main = imported.mod["main"]
    assert [p.name for p in main.params] == ["x", "conv.weight", "fc1.weight", "fc2.weight"]
    assert int(main.attrs["num_input"]) == 1 and len(main.attrs["params"]) == 3
    nodes = {str(k): (str(v["node"]), str(v["op_type"])) for k, v in main.attrs["lpbq.onnx_nodes"].items()}
    assert nodes == {"conv.weight": ("conv", "Conv"), "fc1.weight": ("fc1", "Gemm"), "fc2.weight": ("fc2", "MatMul")}
    assert [(i.name, i.shape, i.dtype) for i in imported.inputs] == [("x", (1, 64, 8, 8), "float32")]
    assert [(o.name, o.shape) for o in imported.outputs] == [("y", (1, 64))]


def test_shape_subgraph_and_dynamic_batch_are_prepared():
    """A Reshape whose target comes from Shape -> Gather -> Concat (dynamic batch) imports after pinning."""
    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    for shapes, batch in ((None, 1), ({"x": [3, 4, 16]}, 3)):
        imported = import_onnx(model, shapes)
        main = imported.mod["main"]
        assert [p.name for p in main.params] == ["x", "w"]  # the int64 constants are not parameters
        x = np.random.default_rng(1).standard_normal((batch, 4, 16)).astype(np.float32)
        actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
        np.testing.assert_allclose(actual, ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_constant_node_weight_becomes_a_parameter():
    weight = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    imported = import_onnx(model)
    assert [p.name for p in imported.mod["main"].params] == ["x", "w"]
    assert imported.layers["w"].node_name == "fc"
    np.testing.assert_array_equal(imported.mod["main"].attrs["params"][0].numpy(), weight)


def test_input_model_is_not_modified():
    model = layer_model(LAYER_CASES[0])
    before = model.SerializeToString()
    import_onnx(model)
    assert model.SerializeToString() == before


def test_unreadable_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(ModelImportError, match=r"cannot read ONNX model '.*corrupt\.onnx': not a valid ONNX file"):
        import_onnx(corrupt)
    with pytest.raises(ModelImportError, match=r"cannot read ONNX model '.*missing\.onnx': no such file"):
        import_onnx(tmp_path / "missing.onnx")


def test_checker_failure_is_reported():
    model = _model(
        [helper.make_node("Relu", ["undefined"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ModelImportError, match=r"fails the ONNX checker: .*undefined"):
        import_onnx(model)


def test_unsupported_ops_are_all_named():
    nodes = [
        helper.make_node("Det", ["x"], ["d"], name="det_node"),
        helper.make_node("Col2Im", ["x3", "shape", "block"], ["c"], name="col2im_node"),
        helper.make_node("Add", ["d", "d"], ["y"]),
    ]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3]),
            helper.make_tensor_value_info("x3", TensorProto.FLOAT, [1, 4, 9]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, 4, 4]),
        ],
        [
            numpy_helper.from_array(np.array([4, 4], np.int64), "shape"),
            numpy_helper.from_array(np.array([2, 2], np.int64), "block"),
        ],
        opset=18,
    )
    with pytest.raises(
        ModelImportError, match=r"does not support: Col2Im \(nodes: col2im_node\); Det \(nodes: det_node\)"
    ):
        import_onnx(model)


def test_dynamic_inner_dimension_needs_an_override():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
    )
    with pytest.raises(
        ModelImportError,
        match=r"input 'x' of shape \[None, None\] has dynamic dimension 1"
        r"|input 'x' of shape \['batch', 'seq'\] has dynamic dimension 1 \('seq'\)",
    ):
        import_onnx(model)
    assert import_onnx(model, {"x": [2, 7]}).inputs[0].shape == (2, 7)


def test_bad_overrides_are_errors():
    model = layer_model(LAYER_CASES[0])
    with pytest.raises(ModelImportError, match=r"input_shapes names unknown input\(s\) z; the model's inputs: x"):
        import_onnx(model, {"z": [1]})
    with pytest.raises(
        ModelImportError, match=r"input 'x' has shape \[3, 128\]; the override \[3, 64\] does not match"
    ):
        import_onnx(model, {"x": [3, 64]})


def test_preparation_reports_what_it_changed():
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones((16, 4), np.float32), "w")],
    )
    changes = import_onnx(model).preparation
    assert changes[0] == "input 'x': shape ['batch', 16] pinned to [1, 16]"
    assert "1 Gemm/MatMul/Conv weights kept as parameters, 0 other constants inlined" in changes


@pytest.mark.slow
def test_model_over_2gb_with_external_data_loads(tmp_path):
    """Protobuf cannot serialize 2 GB: the checker must read the path, the data must come from the side file."""
    from lpbq_tvm.frontend import load_onnx

    rows = (2**31 + 2**26) // (4 * 4096)  # a little over 2 GiB of float32
    nbytes = rows * 4096 * 4
    with (tmp_path / "model.data").open("wb") as data:  # sparse: zeros, then the last value 3.0
        data.seek(nbytes - 4)
        data.write(np.float32(3.0).tobytes())
    weight = onnx.TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[rows, 4096], data_location=onnx.TensorProto.EXTERNAL
    )
    for key, value in (("location", "model.data"), ("offset", "0"), ("length", str(nbytes))):
        weight.external_data.add(key=key, value=value)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [weight],
    )
    (tmp_path / "big.onnx").write_bytes(model.SerializeToString())
    loaded = numpy_helper.to_array(load_onnx(tmp_path / "big.onnx").graph.initializer[0])
    assert loaded.shape == (rows, 4096) and loaded[-1, -1] == 3.0 and not loaded[0].any()


def test_attention_mask_sentinels_are_clamped_without_changing_the_result():
    """-3.4e38 mask entries become -1e4: every other constant value is kept, the change is reported,
    and the softmax (hence the model) computes the same: exp(-1e4 - max) is 0 in float32 as well."""
    model = masked_softmax_model()
    original = numpy_helper.to_array(model.graph.node[0].attribute[0].t)
    preparation = prepare_onnx(model)
    constant = next(node for node in preparation.model.graph.node if node.output[0] == "mask")
    clamped = numpy_helper.to_array(constant.attribute[0].t)
    masked = original < -1e30
    assert masked.any() and np.all(clamped[masked] == -MASK_VALUE)
    np.testing.assert_array_equal(clamped[~masked], original[~masked])
    assert any(f"{int(masked.sum())} mask values (up to -3.4e+38) clamped" in change for change in preparation.changes)

    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32) * 10
    expected = ort_run(model, {"x": x})["y"]
    np.testing.assert_array_equal(ort_run(preparation.model, {"x": x})["y"], expected)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    # A 64-term dot product of probabilities (sum 1, each a few ulp off between the two softmaxes) in
    # another order: |error| <= 2(K+4)u * max|w|.
    bound = 2 * (64 + 4) * 2.0**-24 * np.abs(numpy_helper.to_array(model.graph.initializer[0])).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)
