"""LowerLPBQ with the cpu target's kernel provider (the x86 family on this host): dense layers (a 3-D matmul's
leading axes as rows) and ungrouped convolutions (through im2col), channels first or, after ChannelsLast, NHWC,
take the scheduled kernels and compute the same results as the generic ones."""

from __future__ import annotations

import numpy as np
import pytest
from ir import kernels_called
from model_builders import (
    LAYER_CASES,
    LayerCase,
    assert_float_close,
    dot_product_bound,
    layer_model,
    ort_run,
    with_weight,
)
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.channels_last import ChannelsLast
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges
from lpbq_tvm.targets import get_target

CPU_KERNELS = get_target("cpu").kernel_provider()

DENSE = [case for case in LAYER_CASES if case.op_type != "Conv"]
CONVS = [
    LayerCase("conv1x1_bias_batch2", "Conv", (2, 64, 5, 7), (48, 64, 1, 1), bias=True),
    LayerCase("conv1x1", "Conv", (1, 32, 6, 6), (40, 32, 1, 1)),
    # magika's shape of conv, smaller: a [5, 1] kernel over a [C, L, 1] map
    LayerCase("conv5x1_bias", "Conv", (1, 64, 24, 1), (24, 64, 5, 1), bias=True, attrs={"kernel_shape": [5, 1]}),
    *[case for case in LAYER_CASES if case.op_type == "Conv" and "group" not in case.attrs],
]


def _encoded(case):
    mod = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(import_onnx(layer_model(case, seed=4)).mod))
    return attach_activation_ranges(mod, {"w": {"input": (-1.5, 2.0)}})


CONVS_2D = [case for case in CONVS if len(case.x_shape) == 4]


def _channels_last(mod):
    """ChannelsLast, and the check that the conv now is NHWC."""
    converted = ChannelsLast()(mod)
    assert 'data_layout="NHWC"' in converted["main"].script()
    return converted


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
@pytest.mark.parametrize(
    ("case", "layout"),
    [(case, "NCHW") for case in DENSE + CONVS] + [(case, "NHWC") for case in CONVS_2D],
    ids=lambda v: getattr(v, "name", v),
)
def test_integer_scheduled_kernel_equals_the_generic_one_bit_for_bit(case, layout, mode):
    encoded = _encoded(case)
    fast = LowerLPBQ(mode, kernels=CPU_KERNELS)(_channels_last(encoded) if layout == "NHWC" else encoded)
    generic = LowerLPBQ(mode)(encoded)
    generic_name = "lpbq_conv" if case.op_type == "Conv" else "lpbq_dense"
    assert kernels_called(fast)[-1:] == ["lpbq_dense_x86"] and kernels_called(generic) == [generic_name]
    assert set(kernels_called(fast)) <= {"lpbq_im2col", "lpbq_dense_x86"}
    x = {"x": (np.random.default_rng(1).standard_normal(case.x_shape) * 2).astype(np.float32)}
    (a,) = build(fast).run(x).values()
    (b,) = build(generic).run(x).values()
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize(
    ("case", "layout"),
    [(case, "NCHW") for case in DENSE + CONVS] + [(case, "NHWC") for case in CONVS_2D],
    ids=lambda v: getattr(v, "name", v),
)
def test_weight_only_scheduled_kernel_within_the_float_bound(case, layout):
    encoded = _encoded(case)
    fast = LowerLPBQ("weight-only", kernels=CPU_KERNELS)(_channels_last(encoded) if layout == "NHWC" else encoded)
    assert kernels_called(fast)[-1:] == ["lpbq_dense_x86"] and set(kernels_called(fast)) <= {
        "lpbq_im2col",
        "lpbq_dense_x86",
    }
    assert {p.name for p in fast["main"].params} >= {"w.lpbq_qw", "w.lpbq_kw", "w.lpbq_s"}
    x = np.random.default_rng(2).standard_normal(case.x_shape).astype(np.float32)
    (actual,) = build(fast).run({"x": x}).values()
    (reference,) = build(LowerLPBQ("weight-only")(encoded)).run({"x": x}).values()
    qdq = read_encodings(encoded["main"])["w"].qdq_weight
    assert_float_close(actual, reference, dot_product_bound(case, x, qdq))


def test_other_layers_and_targets_keep_the_generic_kernels():
    """Grouped convs and requantized outputs (htp-sim) are not scheduled here, nor are other targets' layers:
    the aarch64 provider answers with its own family."""
    grouped = next(case for case in LAYER_CASES if "group" in case.attrs)
    assert kernels_called(LowerLPBQ("w4a8", kernels=CPU_KERNELS)(_encoded(grouped))) == ["lpbq_conv"]
    encoded = _encoded(next(case for case in DENSE if not case.bias))
    requantized = attach_activation_ranges(encoded, {"w": {"input": (-1.5, 2.0), "output": (-4.0, 4.0)}})
    assert kernels_called(LowerLPBQ("w4a16", True, CPU_KERNELS)(requantized)) == ["lpbq_dense"]
    aarch64 = get_target("aarch64").kernel_provider()
    assert kernels_called(LowerLPBQ("weight-only", kernels=aarch64)(encoded)) == ["lpbq_dense_aarch64"]


def test_a_layer_output_read_twice_is_not_taken_for_a_bias():
    """Hardswish as exported (``z * clip(z + 3, 0, 6) / 6``): ``z + 3`` is no bias of the 1x1 conv,
    whose output ``z`` is read twice. The conv is lowered once, every use reads it, and no fp32
    copy of the weight survives."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
        helper.make_node("Add", ["z", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Div", ["c", "six"], ["d"]),
        helper.make_node("Mul", ["z", "d"], ["y"]),
    ]
    constants = {"three": 3.0, "zero": 0.0, "six": 6.0}
    graph = helper.make_graph(
        nodes,
        "hardswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((32, 64, 1, 1)).astype(np.float32), "w")]
        + [numpy_helper.from_array(np.float32(v), k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    encoded = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(import_onnx(model).mod))
    lowered = LowerLPBQ("weight-only", kernels=CPU_KERNELS)(encoded)
    assert [name for name in kernels_called(lowered) if name.startswith("lpbq")] == ["lpbq_dense_x86"]  # once
    assert "w" not in {p.name for p in lowered["main"].params}
    x = rng.standard_normal((1, 64, 4, 4)).astype(np.float32)
    qdq = read_encodings(encoded["main"])["w"].qdq_weight
    expected = ort_run(with_weight(model, "w", qdq), {"x": x})["y"]
    (actual,) = build(lowered).run({"x": x}).values()
    assert np.abs(actual - ort_run(model, {"x": x})["y"]).max() > 1e-3  # the quantized weight is used
    # z: 64-term dot products in another order, 2(K+4)u sum|x||w|; then z * clip(z + 3, 0, 6) / 6,
    # whose slope is at most 1.5 + |z| / 6 where the clip is active.
    magnitude = np.einsum("oc,nchw->nohw", np.abs(qdq[:, :, 0, 0]), np.abs(x))
    z = np.einsum("oc,nchw->nohw", qdq[:, :, 0, 0], x)
    bound = (1.5 + np.abs(z) / 6) * 2 * (64 + 4) * 2.0**-24 * magnitude
    assert_float_close(actual, expected, bound)


def test_a_grouped_conv_in_nhwc_runs_the_generic_kernel_between_transposes():
    """ChannelsLast makes every conv2d NHWC; a grouped LPBQ conv has no dense form, so the channels-first
    generic kernel runs between two transposes and computes exactly what it computes without them."""
    grouped = next(case for case in LAYER_CASES if "group" in case.attrs)
    encoded = _encoded(grouped)
    nhwc = LowerLPBQ("w4a8", kernels=CPU_KERNELS)(_channels_last(encoded))
    assert kernels_called(nhwc) == ["lpbq_conv"]
    x = {"x": (np.random.default_rng(5).standard_normal(grouped.x_shape) * 2).astype(np.float32)}
    (a,) = build(nhwc).run(x).values()
    (b,) = build(LowerLPBQ("w4a8")(encoded)).run(x).values()
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))
