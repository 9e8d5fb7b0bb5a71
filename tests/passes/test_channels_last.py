"""ChannelsLast: 2-D convs and the ops between them in NHWC, weights stored in HWIO, same results."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from model_builders import UNIT_ROUNDOFF, LayerCase, layer_model
from onnx import TensorProto, helper, numpy_helper
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.channels_last import ChannelsLast
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ

C, H = 8, 10
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


def test_a_conv_and_the_clip_after_it_run_in_nhwc_between_two_transposes():
    """The input is transposed once, the OIHW weight read through ``permute_dims`` to HWIO (a parameter
    without a value: nothing to store permuted), the clip stays in NHWC, the output is transposed back."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 6, 6), "float32"), w: R.Tensor((8, 4, 3, 3), "float32")):
            with R.dataflow():
                h = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                out = R.clip(h, 0, 6)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 6, 6), "float32"), w: R.Tensor((8, 4, 3, 3), "float32")):
            with R.dataflow():
                nhwc = R.permute_dims(x, axes=[0, 2, 3, 1])
                hwio = R.permute_dims(w, axes=[2, 3, 1, 0])
                h = R.nn.conv2d(nhwc, hwio, padding=[1, 1, 1, 1], data_layout="NHWC", kernel_layout="HWIO")
                clipped = R.clip(h, 0, 6)
                out = R.permute_dims(clipped, axes=[0, 3, 1, 2])
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(ChannelsLast()(Before), Expected)


def test_a_module_without_a_conv2d_is_left_unchanged():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 6), "float32"), w: R.Tensor((8, 4, 3), "float32")):
            with R.dataflow():
                h = R.nn.conv1d(x, w, padding=[1, 1])
                out = R.clip(h, 0, 6)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(ChannelsLast()(Before), Before)


def _conv_clip_depthwise():
    """``depthwise(hardswish(conv3x3(x)))`` with fp32 weights, NCHW; TVM imports HardSwish with a clip."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, C, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((C, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], group=C),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, H])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w1, w2


def test_only_the_model_input_and_output_are_transposed_and_results_agree():
    model, w1, w2 = _conv_clip_depthwise()
    imported = import_onnx(model)
    converted = ChannelsLast()(imported.mod)
    script = converted["main"].script()
    # clip keeps NHWC (the layout rule TVM lacks): one transpose in, one out, none around clip or weights
    assert script.count("R.permute_dims") == 2 and script.count('data_layout="NHWC"') == 2
    shapes = {p.name: tuple(int(d) for d in p.ty.shape) for p in converted["main"].params}
    assert shapes["w1"] == (3, 3, C, C) and shapes["w2"] == (3, 3, 1, C)  # stored in HWIO
    x = np.random.default_rng(1).standard_normal((1, C, H, H)).astype(np.float32)
    infos = {"inputs": imported.inputs, "outputs": imported.outputs, "pipeline": PLAIN}
    channels_last = build(converted, **infos).run({"x": x})["y"]
    channels_first = build(import_onnx(model).mod, **infos).run({"x": x})
    # Both sum the same products in other orders: conv1 (K1 terms) within 2(K1+4)u·K1·max|x|·max|w1|,
    # carried through hardswish (slope (2h + 3) / 6 <= 1.5, and |hardswish(h)| <= |h|) and the depthwise
    # conv (9 taps), plus its own reordering.
    k1, u = C * 9, UNIT_ROUNDOFF
    h_max = k1 * np.abs(x).max() * np.abs(w1).max()
    bound = 9 * np.abs(w2).max() * 1.5 * (2 * (k1 + 4) * u * h_max) + 2 * 13 * u * 9 * h_max * np.abs(w2).max()
    np.testing.assert_allclose(channels_last, channels_first["y"], rtol=0, atol=bound)


def test_lpbq_weights_stay_for_lower_lpbq():
    """A weight with an LPBQ encoding keeps its OIHW parameter, read through ``permute_dims``: LowerLPBQ
    matches it by name and replaces it with packed parameters."""
    case = LayerCase("conv3x3", "Conv", (1, 64, 6, 6), (16, 64, 3, 3), attrs={"kernel_shape": [3, 3], "pads": [1] * 4})
    encoded = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(import_onnx(layer_model(case)).mod))
    converted = ChannelsLast()(encoded)
    shapes = {p.name: tuple(int(d) for d in p.ty.shape) for p in converted["main"].params}
    assert shapes["w"] == (16, 64, 3, 3)
    assert "R.permute_dims(w, axes=[2, 3, 1, 0])" in converted["main"].script()


def _around_convs(nodes, initializers=(), opset: int = 18) -> onnx.ModelProto:
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


@pytest.mark.parametrize("case", OPS_BETWEEN_CONVS)
def test_channels_last_computes_what_channels_first_computes(case):
    """Each op between two convs, compiled with and without ChannelsLast: the same numbers, or the op left in
    its original layout. A layout rule that moves values between channels or positions errs by about |y|
    (or gives NaN); float32 sums of up to 72 terms in another order differ by about 1e-6 of |y| here, so
    1e-4 of max |y| separates the two by two orders of magnitude either way."""
    spec = OPS_BETWEEN_CONVS[case]
    nodes, initializers = (spec, []) if isinstance(spec, list) else spec
    imported = import_onnx(_around_convs(nodes, initializers))
    x = {"x": np.random.default_rng(2).standard_normal((1, C, 6, 6)).astype(np.float32)}
    infos = {"inputs": imported.inputs, "outputs": imported.outputs}
    channels_first = build(imported.mod, **infos).run(x)["y"]
    channels_last = build(ChannelsLast()(imported.mod), **infos).run(x)["y"]
    assert not np.isnan(channels_last).any()
    np.testing.assert_allclose(channels_last, channels_first, rtol=0, atol=1e-4 * np.abs(channels_first).max())


def test_the_layout_rules_it_sets_aside_are_restored():
    """ChannelsLast runs ConvertLayout without layer_norm's rule, and gives it back afterwards."""
    rule = tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FRelaxInferLayout")
    ChannelsLast()(import_onnx(_around_convs(*OPS_BETWEEN_CONVS["layer_norm_over_chw"])).mod)
    assert tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FRelaxInferLayout").same_as(rule)
