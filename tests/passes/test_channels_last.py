"""ChannelsLast: 2-D convs and the ops between them in NHWC, weights stored in HWIO, same results."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conv_cases import CASES, TOLERANCE, C, model_case
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

H = 10
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


@pytest.mark.parametrize("case, dtype", CASES)
def test_channels_last_computes_what_channels_first_computes(case, dtype):
    """Each op next to two convs, on tensors of rank 0 to 5, in float32 and float16, compiled with and
    without ChannelsLast: the same numbers within the float tolerance of TOLERANCE, or the op left in
    its original layout (or the whole module, where TVM's conversion fails)."""
    imported = import_onnx(model_case(case, dtype))
    x = {"x": np.random.default_rng(2).standard_normal((1, C, 6, 6)).astype(dtype)}
    infos = {"inputs": imported.inputs, "outputs": imported.outputs}
    channels_first = build(imported.mod, **infos).run(x)["y"].astype(np.float64)
    channels_last = build(ChannelsLast()(imported.mod), **infos).run(x)["y"].astype(np.float64)
    assert not np.isnan(channels_last).any()
    tolerance = TOLERANCE[dtype] * np.abs(channels_first).max()
    np.testing.assert_allclose(channels_last, channels_first, rtol=0, atol=tolerance)


def test_the_layout_rules_it_sets_aside_are_restored():
    """ChannelsLast runs ConvertLayout without layer_norm's rule, and gives it back afterwards."""
    rule = tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FRelaxInferLayout")
    ChannelsLast()(import_onnx(model_case("layer_norm_over_chw", "float32")).mod)
    assert tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FRelaxInferLayout").same_as(rule)
