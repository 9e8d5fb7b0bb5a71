"""Reductions, pooling, Resize / Upsample and CumSum against onnxruntime.

Max, min, argmax and max pooling select: exact. Sums of ``n`` terms (ReduceSum, ReduceMean,
average pooling, CumSum, the linear and cubic Resize taps) differ by their order: ``2 (n + 4) u``
times the absolute model's output (:func:`harness.dot`). Products, logs and square roots of sums
take a few more roundings.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import OpCase, check, dot, rng, ulps
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

U = 2.0**-24


def _x(*shape, seed=0, low=-2.0, high=2.0):
    return rng(seed).uniform(low, high, shape).astype(np.float32)


def _reduce(op, axes, keepdims=1, x=None, bound=None, noop_with_empty_axes=None):
    x = _x(2, 3, 4, 5) if x is None else x
    attrs = {"keepdims": keepdims}
    if noop_with_empty_axes is not None:
        attrs["noop_with_empty_axes"] = noop_with_empty_axes
    inputs, constants = ["x"], {}
    if axes is not None:
        inputs.append("axes")
        constants["axes"] = np.array(axes, np.int64)
    name = f"{op.lower()}_axes{'none' if axes is None else '_'.join(map(str, axes))}_keepdims{keepdims}"
    return OpCase(name, [helper.make_node(op, inputs, ["y"], **attrs)], {"x": x}, constants=constants, bound=bound)


def _terms(axes, shape=(2, 3, 4, 5)):
    return int(np.prod([shape[a] for a in axes])) if axes else int(np.prod(shape))


REDUCTIONS = [
    _reduce("ReduceMax", [1]),
    _reduce("ReduceMin", [-1], keepdims=0),
    _reduce("ReduceMax", None),
    _reduce("ReduceSum", [1, 3], bound=dot(_terms([1, 3]))),
    _reduce("ReduceSum", None, keepdims=0, bound=dot(_terms(None))),
    _reduce("ReduceMean", [2], bound=dot(_terms([2]), 1)),
    _reduce("ReduceMean", [0, 2, 3], keepdims=0, bound=dot(_terms([0, 2, 3]), 1)),
    _reduce("ReduceSumSquare", [3], bound=dot(_terms([3]), 1)),
    _reduce("ReduceL1", [1], bound=dot(_terms([1]))),
    _reduce("ReduceL2", [3], bound=dot(_terms([3]), 2)),
    _reduce("ReduceProd", [1], x=_x(2, 3, 4, 5, low=0.5, high=1.5), bound=ulps(2 * 3)),
    _reduce("ReduceLogSumExp", [3], bound=ulps(2 * (5 + 8))),
    _reduce("ReduceLogSum", [2], x=_x(2, 3, 4, 5, low=0.1, high=2.0), bound=ulps(2 * (4 + 4))),
    _reduce("ReduceSum", [], noop_with_empty_axes=1),  # no axes, no reduction: the input itself
]


def _arg(op, axis, keepdims=1, select_last_index=0):
    x = rng(1).integers(0, 5, (3, 4, 6)).astype(np.float32)  # ties: which index is part of the definition
    node = helper.make_node(op, ["x"], ["y"], axis=axis, keepdims=keepdims, select_last_index=select_last_index)
    return OpCase(f"{op.lower()}_axis{axis}_keepdims{keepdims}_last{select_last_index}", [node], {"x": x})


ARG = [_arg("ArgMax", 1), _arg("ArgMin", -1, keepdims=0), _arg("ArgMax", 2, select_last_index=1)]

TOPK = OpCase(
    "topk_largest_sorted",
    [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)],
    {"x": rng(2).permutation(60).reshape(3, 20).astype(np.float32)},  # distinct values: one answer
    outputs=("values", "indices"),
    constants={"k": np.array([5], np.int64)},
)


def _pool(op, x_shape=(1, 3, 9, 10), bound=None, **attrs):
    name = op.lower() + "".join(f"_{k}{'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in attrs.items())
    return OpCase(name, [helper.make_node(op, ["x"], ["y"], **attrs)], {"x": _x(*x_shape, seed=3)}, bound=bound)


POOLING = [
    _pool("MaxPool", kernel_shape=[3, 3]),
    _pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    _pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    _pool("MaxPool", kernel_shape=[3, 3], dilations=[2, 2]),
    _pool("MaxPool", x_shape=(2, 4, 11), kernel_shape=[3], strides=[2]),
    _pool("AveragePool", kernel_shape=[3, 3], bound=dot(9, 1)),
    _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], bound=dot(9, 1)),
    _pool("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, bound=dot(9, 1)),
    _pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, bound=dot(4, 1)),
    _pool("AveragePool", x_shape=(2, 4, 11), kernel_shape=[4], strides=[3], bound=dot(4, 1)),
    _pool("GlobalAveragePool", bound=dot(90, 1)),
    _pool("GlobalMaxPool"),
    _pool("LpPool", kernel_shape=[2, 2], p=2, bound=ulps(2 * (4 + 6))),
]


def _interpolation(taps: int, lipschitz: float):
    """Against the ONNX reference (float64): the taps' sum within (taps + 4) u of max|x| (weights sum
    to at most 1.5); the float32 source coordinate within 4 u of the input length, moving the
    result by ``lipschitz`` (the kernel's steepest total slope) times that times max|x|."""

    def bound(run):
        x = np.abs(run.inputs["x"]).max()
        length = max(run.inputs["x"].shape[2:])
        return {"y": (taps + 4) * U * 1.5 * x + 4 * U * length * lipschitz * x}

    return bound


def _resize(id, scales=None, sizes=None, x_shape=(1, 2, 4, 5), bound=None, opset=18, **attrs):
    inputs, constants = ["x", "", ""], {}
    if scales is not None:
        inputs[2] = "scales"
        constants["scales"] = np.array(scales, np.float32)
    else:
        inputs.append("sizes")
        constants["sizes"] = np.array(sizes, np.int64)
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    truth = None
    if bound is not None:  # interpolating: against the ONNX reference evaluator in float64

        def truth(values, node=node, constants=constants):
            graph = helper.make_graph(
                [node],
                id,
                [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
                [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                [numpy_helper.from_array(value, name) for name, value in constants.items()],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            return {"y": ReferenceEvaluator(model).run(None, {"x": values["x"]})[0]}

    return OpCase(id, [node], {"x": _x(*x_shape, seed=4)}, constants=constants, bound=bound, opset=opset, truth=truth)


LINEAR = _interpolation(4, 2.0)  # bilinear: slope at most 1 per axis
CUBIC = _interpolation(16, 6.0)  # bicubic: the kernel's slopes sum to under 3 per axis

RESIZES = [
    _resize("resize_nearest_upsample2", scales=[1, 1, 2, 2], mode="nearest"),
    _resize(
        "resize_nearest_sizes_floor_asymmetric",
        sizes=[1, 2, 7, 3],
        mode="nearest",
        nearest_mode="floor",
        coordinate_transformation_mode="asymmetric",
    ),
    _resize(
        "resize_nearest_round_prefer_ceil_half_pixel",
        scales=[1, 1, 1.5, 0.6],
        mode="nearest",
        nearest_mode="round_prefer_ceil",
    ),
    _resize("resize_linear_half_pixel", scales=[1, 1, 2, 2], mode="linear", bound=LINEAR),
    _resize(
        "resize_linear_align_corners",
        sizes=[1, 2, 7, 9],
        mode="linear",
        coordinate_transformation_mode="align_corners",
        bound=LINEAR,
    ),
    _resize(
        "resize_linear_pytorch_half_pixel_down",
        scales=[1, 1, 0.5, 0.8],
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
        bound=LINEAR,
    ),
    _resize("resize_cubic", scales=[1, 1, 2, 2], mode="cubic", bound=CUBIC),
    _resize(
        "resize_cubic_align_corners_a05",
        sizes=[1, 2, 6, 8],
        mode="cubic",
        cubic_coeff_a=-0.5,
        coordinate_transformation_mode="align_corners",
        bound=CUBIC,
    ),
    OpCase(
        "upsample_nearest_opset9",
        [helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
        {"x": _x(1, 2, 3, 4, seed=5)},
        constants={"scales": np.array([1, 1, 2, 3], np.float32)},
        opset=9,
        importer_error="object of type 'NoneType' has no len()",
    ),
]

CUMSUM = [
    OpCase(
        f"cumsum_axis{axis}_exclusive{exclusive}_reverse{reverse}",
        [helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=exclusive, reverse=reverse)],
        {"x": _x(3, 12, seed=6)},
        constants={"axis": np.array(axis, np.int32)},
        bound=dot(12),
    )
    for axis, exclusive, reverse in [(1, 0, 0), (0, 1, 0), (-1, 0, 1), (1, 1, 1)]
]


@pytest.mark.parametrize("case", REDUCTIONS + ARG + [TOPK] + POOLING + RESIZES + CUMSUM, ids=str)
def test_reductions_pooling_and_resampling(case):
    check(case)
