"""EncodeLPBQ: the attached encodings are exactly the numpy encoder's, read back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from model_builders import LAYER_CASES, constant_weight_module, layer_model
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx
from tvm.script import relax as R

from lpbq_tvm.encoder import LPBQConfig, encode_lpbq
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings


@pytest.mark.parametrize("case", [LAYER_CASES[0], LAYER_CASES[2], LAYER_CASES[7]], ids=lambda c: c.name)
def test_encodings_equal_the_encoder(case):
    model = layer_model(case, seed=3)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    mod = from_onnx(model, keep_params_in_input=True)
    encoded = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(mod))
    tvm.ir.assert_structural_equal(encoded["main"].body, mod["main"].body)
    (encoding,) = read_encodings(encoded["main"]).values()
    channel_axis, block_axis = (0, 1) if case.op_type == "Conv" or case.attrs.get("transB") else (1, 0)
    expected = encode_lpbq(weight, channel_axis, block_axis, block_size=32)
    np.testing.assert_array_equal(encoding.per_channel_scale.view(np.int64), expected.per_channel_scale.view(np.int64))
    np.testing.assert_array_equal(encoding.per_block_int_scale, expected.per_block_int_scale)
    np.testing.assert_array_equal(encoding.int_weight, expected.int_weight)
    np.testing.assert_array_equal(encoding.qdq_weight.view(np.int32), expected.qdq_weight.view(np.int32))
    stored = encoded["main"].attrs["lpbq.encodings"]["w"]
    assert float(stored["sqnr_db"]) == pytest.approx(
        10
        * np.log10(
            np.sum(weight.astype(np.float64) ** 2) / np.sum((weight.astype(np.float64) - expected.qdq_weight) ** 2)
        )
    )


def test_non_finite_weight_names_the_node():
    case = LAYER_CASES[1]
    weight = np.ones(case.w_shape, np.float32)
    weight[3, 7] = np.nan
    mod = from_onnx(layer_model(case, weight=weight), keep_params_in_input=True)
    with pytest.raises(ValueError, match=r"w: weight shape \(32, 128\) contains non-finite values"):
        EncodeLPBQ()(AnnotateLPBQ()(mod))


def test_parameter_without_value_is_a_clear_error():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 64), "float32"), w: R.Tensor((64, 8), "float32")) -> R.Tensor((2, 8), "float32"):
            R.func_attr({"num_input": 1})
            return R.matmul(x, w)

    with pytest.raises(ValueError, match=r"weight 'w' is a function parameter without a value"):
        EncodeLPBQ()(AnnotateLPBQ()(Before))


def test_does_not_apply_without_annotations():
    mod = from_onnx(layer_model(LAYER_CASES[0]), keep_params_in_input=True)
    assert EncodeLPBQ()(mod).same_as(mod)


def test_constant_weight_is_encoded():
    value = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    Before = constant_weight_module(value)
    (encoding,) = read_encodings(EncodeLPBQ()(AnnotateLPBQ()(Before))["main"]).values()
    np.testing.assert_array_equal(encoding.int_weight, encode_lpbq(value, 1, 0).int_weight)
