"""If (a condition computed from the input, branches reading outer-scope values), sequences
(SequenceConstruct, SplitToSequence, ConcatFromSequence, SequenceAt, a sequence output) and
Optional against onnxruntime. Only values are moved or selected here, so every output is exact."""

from __future__ import annotations

import numpy as np
import pytest
from harness import OpCase, check, rng
from onnx import TensorProto, helper, numpy_helper

X = rng(0).standard_normal((4, 6)).astype(np.float32)


def _if_case(sign: float) -> OpCase:
    """``y = If(ReduceSum(x) > 0, then: x * 2 + w, else: Neg(x) - w)``; ``w`` is an outer initializer."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]), helper.make_node("Add", ["doubled", "w"], ["then_y"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(np.float32(2), "two")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["negated"]), helper.make_node("Sub", ["negated", "w"], ["else_y"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [4, 6])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    x = np.abs(X) * sign
    constants = {"zero": np.float32(0), "w": rng(1).standard_normal((4, 6)).astype(np.float32)}
    return OpCase(f"if_computed_condition_{'then' if sign > 0 else 'else'}", nodes, {"x": x}, constants=constants)


CASES = [
    _if_case(1.0),
    _if_case(-1.0),
    OpCase(
        "concat_from_sequence_new_axis",
        [
            helper.make_node("SequenceConstruct", ["x", "x2"], ["s"]),
            helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0, new_axis=1),
        ],
        {"x": X, "x2": -X},
        opset=14,
    ),
    OpCase(
        "concat_from_sequence_axis1",
        [
            helper.make_node("SequenceConstruct", ["x", "x2", "x"], ["s"]),
            helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=1),
        ],
        {"x": X, "x2": -X},
        opset=14,
    ),
    OpCase(
        "split_to_sequence_chunks_of_two",  # a scalar split is a chunk length
        [helper.make_node("SplitToSequence", ["x", "split"], ["y"], axis=1)],
        {"x": X},
        constants={"split": np.array(2, np.int64)},
        opset=14,
    ),
    OpCase(
        "split_to_sequence_sizes",
        [helper.make_node("SplitToSequence", ["x", "split"], ["y"], axis=0)],
        {"x": X},
        constants={"split": np.array([1, 3], np.int64)},
        opset=14,
    ),
    OpCase(
        "sequence_at_negative_index",
        [
            helper.make_node("SequenceConstruct", ["x", "x2"], ["s"]),
            helper.make_node("SequenceAt", ["s", "index"], ["y"]),
        ],
        {"x": X, "x2": -X},
        constants={"index": np.array(-1, np.int64)},
        opset=14,
    ),
    OpCase(
        "sequence_output",
        [helper.make_node("SequenceConstruct", ["x", "x2"], ["y"])],
        {"x": X, "x2": X[:2] * 3},
        opset=14,
    ),
    OpCase(
        "optional_get_element",
        [helper.make_node("Optional", ["x"], ["o"]), helper.make_node("OptionalGetElement", ["o"], ["y"])],
        {"x": X},
        opset=18,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_control_flow_and_sequences(case):
    check(case)
