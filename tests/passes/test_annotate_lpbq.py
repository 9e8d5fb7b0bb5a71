"""AnnotateLPBQ: which layers are selected, with which axes and config, and why others are not."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import constants
from model_builders import DEPTHWISE_CASE, LAYER_CASES, constant_weight_module, layer_model
from tvm.relax.frontend.onnx import from_onnx
from tvm.script import relax as R

from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ

EXPECTED_AXES = {"Gemm transB=1": (0, 1), "Gemm transB=0": (1, 0), "MatMul": (1, 0), "Conv": (0, 1)}


def _import(case):
    return from_onnx(layer_model(case), keep_params_in_input=True)


def _attr(mod, name):
    return {str(k): dict(v) for k, v in mod["main"].attrs[name].items()}


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_every_op_form_is_annotated_with_its_axes(case):
    mod = _import(case)
    annotated = AnnotateLPBQ(LPBQConfig(block_size=64))(mod)
    tvm.ir.assert_structural_equal(annotated["main"].body, mod["main"].body)  # only attributes change
    weights = _attr(annotated, "lpbq.weights")
    assert list(weights) == ["w"]
    entry = weights["w"]
    expected_axes = (0, 1) if case.op_type == "Conv" or case.attrs.get("transB") else (1, 0)
    assert (int(entry["channel_axis"]), int(entry["block_axis"])) == expected_axes
    assert int(entry["block_size"]) == 64 and int(entry["bitwidth"]) == 4 and int(entry["decompressed_bw"]) == 8
    assert _attr(annotated, "lpbq.skipped") == {}


def test_depthwise_conv_is_skipped_with_reason():
    annotated = AnnotateLPBQ()(_import(DEPTHWISE_CASE))
    skipped = _attr(annotated, "lpbq.skipped")
    assert "depthwise conv" in skipped["w"]["reason"] and "groups 16" in skipped["w"]["reason"]
    assert _attr(annotated, "lpbq.weights") == {}


def test_strict_raises_naming_node_shape_axis_and_block_size():
    with pytest.raises(
        ValueError,
        match=r"strict LPBQ: w: weight shape \(32, 128\): input-channel length 128 "
        r"along block axis 1 is not divisible by block_size 48",
    ):
        AnnotateLPBQ(LPBQConfig(block_size=48), strict=True)(_import(LAYER_CASES[0]))


def test_not_divisible_is_skipped_when_not_strict():
    annotated = AnnotateLPBQ(LPBQConfig(block_size=48))(_import(LAYER_CASES[0]))
    assert "not divisible by block_size 48" in _attr(annotated, "lpbq.skipped")["w"]["reason"]


def test_op_type_not_selected_and_excluded_are_reasons():
    mod = _import(LAYER_CASES[0])
    assert _attr(AnnotateLPBQ(op_types=["Conv"])(mod), "lpbq.skipped")["w"]["reason"] == "op type Gemm not selected"
    assert _attr(AnnotateLPBQ(excluded_nodes=["w"])(mod), "lpbq.skipped")["w"]["reason"] == "excluded by the user"


def test_later_application_wins_for_its_op_types_only():
    """A second pass over Conv leaves the Gemm annotation of the first pass alone."""
    mod = _import(LAYER_CASES[0])
    first = AnnotateLPBQ(LPBQConfig(block_size=32))(mod)
    second = AnnotateLPBQ(LPBQConfig(block_size=16), op_types=["Conv"])(first)
    assert int(_attr(second, "lpbq.weights")["w"]["block_size"]) == 32
    third = AnnotateLPBQ(LPBQConfig(block_size=16), op_types=["Gemm"])(second)
    assert int(_attr(third, "lpbq.weights")["w"]["block_size"]) == 16


def test_unknown_op_type_is_an_error():
    with pytest.raises(ValueError, match=r"unknown op type\(s\) Attention; LPBQ applies to Gemm, MatMul, Conv"):
        AnnotateLPBQ(op_types=["Gemm", "Attention"])


def test_constant_weight_is_annotated_and_keeps_the_constant():
    module = constant_weight_module(np.ones((128, 16), np.float32))
    annotated = AnnotateLPBQ()(module)
    (key,) = _attr(annotated, "lpbq.weights")
    assert key == "constant0"
    assert annotated["main"].attrs["lpbq.weights"][key]["constant"].same_as(constants(module["main"].body)[0])
    assert _attr(annotated, "lpbq.weights")[key]["op_type"] == "MatMul"


def test_does_not_apply_without_candidates():
    """A function with no weight layer is returned unchanged (the same object)."""

    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), y: R.Tensor((8, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 2})
            return R.matmul(x, R.nn.relu(y))

    assert AnnotateLPBQ()(Before).same_as(Before)
