"""Small models around 2-D convs that the rewrite passes are checked on: one op (or a few) between two
3x3 convs on [1, 8, 6, 6], on tensors of rank 0 to 5, in float32 and float16 (:func:`model_case`)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C = 8


def around_convs(nodes, initializers=(), opset: int = 18) -> onnx.ModelProto:
    """``conv3x3(op(conv3x3(x)))`` on [1, 8, 6, 6]: ``nodes`` read ``a`` (the first conv's output) and
    write ``m`` (the second conv's input)."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) / 8).astype(np.float32), name)
        for name in ("w1", "w2")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
            *nodes,
            helper.make_node("Conv", ["m", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [*weights, *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _floats(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _ints(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


_RNG = np.random.default_rng(1)
_SLICE_C = [_ints("c0", [0]), _ints("c1", [C]), _ints("c_axis", [1])]
OPS_BETWEEN_CONVS = {
    "relu": [helper.make_node("Relu", ["a"], ["m"])],
    "hardswish": [helper.make_node("HardSwish", ["a"], ["m"])],
    "swish": [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["m"])],
    "prelu": ([helper.make_node("PRelu", ["a", "slope"], ["m"])], [_floats("slope", _RNG.uniform(0, 0.3, (C, 1, 1)))]),
    "batch_norm": (
        [helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "v"], ["m"])],
        [_floats(n, _RNG.uniform(0.5, 1.5, C)) for n in ("g", "b", "mu", "v")],
    ),
    "instance_norm": (
        [helper.make_node("InstanceNormalization", ["a", "g", "b"], ["m"])],
        [_floats("g", _RNG.uniform(0.5, 1.5, C)), _floats("b", _RNG.standard_normal(C))],
    ),
    "layer_norm_over_chw": (
        [helper.make_node("LayerNormalization", ["a", "g", "b"], ["m"], axis=1)],
        [_floats("g", _RNG.uniform(0.5, 1.5, (C, 6, 6))), _floats("b", _RNG.standard_normal((C, 6, 6)))],
    ),
    "layer_norm_over_w": (
        [helper.make_node("LayerNormalization", ["a", "g", "b"], ["m"], axis=-1)],
        [_floats("g", _RNG.uniform(0.5, 1.5, 6)), _floats("b", _RNG.standard_normal(6))],
    ),
    "softmax_over_c": [helper.make_node("Softmax", ["a"], ["m"], axis=1)],
    "softmax_over_w": [helper.make_node("Softmax", ["a"], ["m"], axis=-1)],
    "mean_over_c": (
        [helper.make_node("ReduceMean", ["a", "axes"], ["r"]), helper.make_node("Sub", ["a", "r"], ["m"])],
        [_ints("axes", [1])],
    ),
    "mean_over_hw": (
        [helper.make_node("ReduceMean", ["a", "axes"], ["r"]), helper.make_node("Mul", ["a", "r"], ["m"])],
        [_ints("axes", [2, 3])],
    ),
    "cumsum_over_c": ([helper.make_node("CumSum", ["a", "axis"], ["m"])], [_ints("axis", 1)]),
    "max_pool": [helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2])],
    "average_pool": [helper.make_node("AveragePool", ["a"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
    "squeeze_excite": [helper.make_node("GlobalAveragePool", ["a"], ["p"]), helper.make_node("Mul", ["a", "p"], ["m"])],
    "resize_nearest": ([helper.make_node("Resize", ["a", "", "s"], ["m"])], [_floats("s", [1, 1, 2, 2])]),
    "resize_linear": ([helper.make_node("Resize", ["a", "", "s"], ["m"], mode="linear")], [_floats("s", [1, 1, 2, 2])]),
    "concat_slice": (
        [
            helper.make_node("Concat", ["a", "a"], ["c"], axis=1),
            helper.make_node("Slice", ["c", "c0", "c1", "c_axis"], ["m"]),
        ],
        _SLICE_C,
    ),
    "split_concat": (
        [
            helper.make_node("Split", ["a", "parts"], ["s1", "s2"], axis=1),
            helper.make_node("Concat", ["s2", "s1"], ["m"], axis=1),
        ],
        [_ints("parts", [3, 5])],
    ),
    "pad_slice": (
        [helper.make_node("Pad", ["a", "pads"], ["p"]), helper.make_node("Slice", ["p", "c0", "c1", "c_axis"], ["m"])],
        [_ints("pads", [0, 0, 1, 1, 0, 0, 1, 1]), *_SLICE_C],
    ),
    "reverse_channels": (
        [helper.make_node("Slice", ["a", "start", "end", "c_axis", "step"], ["m"])],
        [_ints("start", [-1]), _ints("end", [-100]), _ints("c_axis", [1]), _ints("step", [-1])],
    ),
    "transpose_hw": [helper.make_node("Transpose", ["a"], ["m"], perm=[0, 1, 3, 2])],
    "depth_to_space": [
        helper.make_node("DepthToSpace", ["a"], ["d"], blocksize=2),
        helper.make_node("SpaceToDepth", ["d"], ["m"], blocksize=2),
    ],
    "conv_transpose": (
        [helper.make_node("ConvTranspose", ["a", "wt"], ["m"], pads=[1, 1, 1, 1])],
        [_floats("wt", _RNG.standard_normal((C, C, 3, 3)) / 8)],
    ),
    "conv_transpose_stride2": (
        [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("ConvTranspose", ["r", "wt"], ["m"], strides=[2, 2])],
        [_floats("wt", _RNG.standard_normal((C, C, 2, 2)) / 4)],
    ),
    "lrn": [helper.make_node("LRN", ["a"], ["m"], size=3)],
}


# Ops on tensors of other ranks next to the convs (rank 0 to 5): ConvertLayout sees them too.
OPS_ON_OTHER_RANKS = {
    "rank0_max": (
        [
            helper.make_node("ReduceMax", ["a"], ["s"], keepdims=0),
            helper.make_node("Max", ["s", "half"], ["t"]),
            helper.make_node("Div", ["a", "t"], ["m"]),
        ],
        [_floats("half", 0.5)],
    ),
    "rank1_softmax": (
        [
            helper.make_node("GlobalAveragePool", ["a"], ["p"]),
            helper.make_node("Reshape", ["p", "vector"], ["v"]),
            helper.make_node("Softmax", ["v"], ["w"], axis=0),
            helper.make_node("Reshape", ["w", "nchw"], ["g"]),
            helper.make_node("Mul", ["a", "g"], ["m"]),
        ],
        [_ints("vector", [C]), _ints("nchw", [1, C, 1, 1])],
    ),
    "rank2_softmax": (
        [
            helper.make_node("Flatten", ["a"], ["f"]),
            helper.make_node("Softmax", ["f"], ["g"], axis=-1),
            helper.make_node("Reshape", ["g", "nchw"], ["m"]),
        ],
        [_ints("nchw", [1, C, 6, 6])],
    ),
    "rank3_softmax_over_c": (
        [
            helper.make_node("Reshape", ["a", "ncl"], ["r"]),
            helper.make_node("Softmax", ["r"], ["g"], axis=1),
            helper.make_node("Reshape", ["g", "nchw"], ["m"]),
        ],
        [_ints("ncl", [1, C, 36]), _ints("nchw", [1, C, 6, 6])],
    ),
    "rank3_reshape_then_elementwise": (
        [
            helper.make_node("Reshape", ["a", "rows"], ["r"]),
            helper.make_node("Relu", ["r"], ["q"]),
            helper.make_node("Mul", ["q", "scale"], ["g"]),
            helper.make_node("Reshape", ["g", "nchw"], ["m"]),
        ],
        [_ints("rows", [1, C * 6, 6]), _floats("scale", _RNG.uniform(0.5, 1.5, 6)), _ints("nchw", [1, C, 6, 6])],
    ),
    "rank5_softmax_over_groups": (
        [
            helper.make_node("Reshape", ["a", "grouped"], ["r"]),
            helper.make_node("Softmax", ["r"], ["g"], axis=1),
            helper.make_node("Reshape", ["g", "nchw"], ["m"]),
        ],
        [_ints("grouped", [1, 2, C // 2, 6, 6]), _ints("nchw", [1, C, 6, 6])],
    ),
}

# float16 sums of the 72-term convs in another order differ by up to 2 (72 + 4) 2^-11 = 0.074 of the
# terms' magnitude (measured: under 5e-3 of max |y|); float32 ones by about 1e-6 of |y|. A layout
# rule that moves values between channels or positions errs by about |y| (or gives NaN).
TOLERANCE = {"float32": 1e-4, "float16": 0.1}
CASES = [
    (case, dtype)
    for case in [*OPS_BETWEEN_CONVS, *OPS_ON_OTHER_RANKS]
    for dtype in TOLERANCE
    if (case, dtype) != ("lrn", "float16")  # TVM's LRN importer mixes in float32 constants: refused
]


def in_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value_info in [*model.graph.input, *model.graph.output]:
        value_info.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def model_case(case: str, dtype: str) -> onnx.ModelProto:
    """The model of ``case`` (a key of OPS_BETWEEN_CONVS or OPS_ON_OTHER_RANKS) in ``dtype``."""
    spec = {**OPS_BETWEEN_CONVS, **OPS_ON_OTHER_RANKS}[case]
    nodes, initializers = (spec, []) if isinstance(spec, list) else spec
    model = around_convs(nodes, initializers)
    return in_float16(model) if dtype == "float16" else model
