"""Data movement and shape ops against onnxruntime: every value is copied, selected or counted,
never computed, so the compiled result must equal onnxruntime's exactly."""

from __future__ import annotations

import numpy as np
import pytest
from harness import OpCase, check, rng
from onnx import helper

X = rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)


def _case(id, op, inputs=None, constants=None, outputs=("y",), opset=18, order=None, **attrs):
    """``op`` reading ``inputs`` (default ``x``) then ``constants``, or the names in ``order``."""
    inputs = {"x": X} if inputs is None else inputs
    constants = constants or {}
    node = helper.make_node(op, order or [*inputs, *constants], list(outputs), **attrs)
    return OpCase(id, [node], inputs, outputs=outputs, constants=constants, opset=opset)


def _i64(*values):
    return np.array(values, np.int64)


CASES = [
    _case("transpose", "Transpose", perm=[0, 2, 3, 1]),
    _case("transpose_default_reverses", "Transpose"),
    _case("reshape_infer_dim", "Reshape", constants={"shape": _i64(2, -1, 5)}),
    _case("reshape_zero_copies_dim", "Reshape", constants={"shape": _i64(0, 0, -1)}),
    _case("flatten_axis2", "Flatten", axis=2),
    _case("squeeze", "Squeeze", inputs={"x": X[:, :1]}, constants={"axes": _i64(1)}),
    _case("unsqueeze_two_axes", "Unsqueeze", constants={"axes": _i64(0, -1)}),
    _case("concat_axis1", "Concat", inputs={"a": X, "b": X[:, :2] * 2}, axis=1),
    _case("split_uneven", "Split", constants={"split": _i64(1, 3)}, outputs=("y", "z"), axis=2),
    _case("split_num_outputs", "Split", outputs=("y", "z"), axis=1, num_outputs=2),
    _case(
        "slice_steps_negative",
        "Slice",
        constants={"starts": _i64(-1, 0), "ends": _i64(-5, 5), "axes": _i64(3, 2), "steps": _i64(-2, 3)},
    ),
    _case("slice_clamped_ends", "Slice", constants={"starts": _i64(1), "ends": _i64(1000), "axes": _i64(1)}),
    _case(
        "slice_bounds_known_at_run_time",
        "Slice",
        inputs={"x": X, "starts": _i64(0, 1), "ends": _i64(2, 4), "axes": _i64(0, 2), "steps": _i64(1, 2)},
    ),
    _case("gather_axis1", "Gather", constants={"indices": _i64(2, 0, 2)}, axis=1),
    _case(
        "gather_negative_indices_2d", "Gather", constants={"indices": np.array([[-1, 0], [1, -2]], np.int64)}, axis=3
    ),
    _case("gather_scalar_index", "Gather", constants={"indices": np.array(1, np.int64)}, axis=0),
    _case("gather_elements", "GatherElements", constants={"indices": rng(1).integers(-4, 4, (2, 3, 2, 5))}, axis=2),
    _case("gather_nd", "GatherND", constants={"indices": np.array([[[0, 1], [1, 2]]], np.int64)}),
    _case(
        "gather_nd_batch_dims1", "GatherND", constants={"indices": np.array([[1, 3], [0, 0]], np.int64)}, batch_dims=1
    ),
    _case(
        "scatter_elements",
        "ScatterElements",
        inputs={"x": X, "updates": -X[:, :, :1]},
        constants={"indices": rng(2).integers(0, 4, (2, 3, 1, 5))},
        axis=2,
        order=["x", "indices", "updates"],
    ),
    _case(
        "scatter_elements_add",
        "ScatterElements",
        inputs={"x": X, "updates": X[:, :, :2]},
        constants={"indices": np.tile(_i64(1, 1).reshape(1, 1, 2, 1), (2, 3, 1, 5))},
        axis=2,
        reduction="add",
        order=["x", "indices", "updates"],
    ),
    _case(
        "scatter_nd",
        "ScatterND",
        inputs={"x": X, "updates": -X[:2, 0]},
        constants={"indices": np.array([[0, 1], [1, 2]], np.int64)},
        order=["x", "indices", "updates"],
    ),
    _case("pad_constant", "Pad", constants={"pads": _i64(0, 1, 2, 0, 0, 0, 1, 3), "value": np.array(0.5, np.float32)}),
    _case("pad_reflect", "Pad", constants={"pads": _i64(0, 0, 2, 1, 0, 0, 1, 3)}, mode="reflect"),
    _case("pad_edge", "Pad", constants={"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}, mode="edge"),
    _case("pad_wrap", "Pad", constants={"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}, mode="wrap", opset=19),
    _case("pad_axes", "Pad", constants={"pads": _i64(1, 2), "value": np.array(0, np.float32), "axes": _i64(3)}),
    _case("tile", "Tile", constants={"repeats": _i64(1, 2, 1, 3)}),
    _case("expand", "Expand", inputs={"x": X[:, :1, :, :1]}, constants={"shape": _i64(2, 3, 4, 5)}),
    _case("expand_new_leading_dims", "Expand", inputs={"x": X[0, 0, 0]}, constants={"shape": _i64(3, 1, 5)}),
    _case(
        "depth_to_space_dcr",
        "DepthToSpace",
        inputs={"x": rng(3).standard_normal((1, 8, 2, 3)).astype(np.float32)},
        blocksize=2,
    ),
    _case(
        "depth_to_space_crd",
        "DepthToSpace",
        inputs={"x": rng(3).standard_normal((1, 8, 2, 3)).astype(np.float32)},
        blocksize=2,
        mode="CRD",
    ),
    _case(
        "space_to_depth",
        "SpaceToDepth",
        blocksize=2,
        inputs={"x": rng(4).standard_normal((1, 2, 4, 6)).astype(np.float32)},
    ),
    _case("shape_with_start_end", "Shape", start=1, end=-1),
    _case("size", "Size"),
    _case("identity", "Identity"),
    _case(
        "range",
        "Range",
        inputs={},
        constants={"start": np.array(3, np.int64), "limit": np.array(-8, np.int64), "delta": np.array(-2, np.int64)},
    ),
    _case(
        "range_float",
        "Range",
        inputs={},
        constants={"start": np.float32(0.5), "limit": np.float32(4.0), "delta": np.float32(0.75)},
    ),
    _case(
        "one_hot",
        "OneHot",
        inputs={"indices": _i64(0, 3, -1, 2)},
        constants={"depth": np.array(5, np.int64), "values": np.array([0.0, 2.0], np.float32)},
        axis=-1,
    ),
    _case("eye_like", "EyeLike", inputs={"x": X[0, 0]}, k=1),
    _case("trilu_upper_k1", "Trilu", inputs={"x": X[0]}, constants={"k": np.array(1, np.int64)}),
    _case("trilu_lower", "Trilu", inputs={"x": X[0]}, upper=0),
    _case(
        "constant_of_shape",
        "ConstantOfShape",
        inputs={"shape": _i64(2, 3)},
        value=helper.make_tensor("v", 1, [1], [1.5]),
    ),
    _case("where_broadcast", "Where", inputs={"c": X > 0, "a": X, "b": np.float32([-1.0])}),
    _case("compress_axis", "Compress", constants={"condition": np.array([True, False, True])}, axis=1),
    _case("nonzero", "NonZero", inputs={"x": (X > 0.5).astype(np.float32)}),
    _case("unique_sorted", "Unique", inputs={"x": rng(5).integers(0, 6, 20).astype(np.float32)}, sorted=1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_data_movement(case):
    check(case)
