"""The CPU targets' Relax pipeline: the rewrites before legalization and the rules after fusion, together on
small models (a conv with its batch norm and activation, transcendentals, an LPBQ conv and its activation)."""

from __future__ import annotations

import math

import numpy as np
from ir import block_names, prim_funcs
from model_builders import UNIT_ROUNDOFF, assert_float_close, cpu_scheduled, simulation_bound, unary_model
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend import detach_params

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.compiler import build, lower
from lpbq_tvm.compiler import compile as compile_model
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.targets import get_target

CPU = get_target("cpu")


def test_conv_batch_norm_and_activation_run_as_one_function():
    """Depthwise conv -> BatchNormalization -> HardSwish: the batch norm becomes one scale and one
    shift (its tuple dropped), so all three fuse into one function, the epilogue applied as each
    register tile is stored, dividing nowhere (HardSwish by the reciprocal of 6); checked against
    float64 numpy with the bound of each step's float32 error."""
    rng = np.random.default_rng(4)
    c, u = 8, UNIT_ROUNDOFF
    weight = rng.standard_normal((c, 1, 3, 3))
    gamma, beta, mean, var = rng.random(c) + 0.5, rng.standard_normal(c), rng.standard_normal(c), rng.random(c) + 0.5
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["z", "g", "b", "m", "v"], ["n"]),
        helper.make_node("HardSwish", ["n"], ["y"]),
    ]
    params = {"w": weight, "g": gamma, "b": beta, "m": mean, "v": var}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 10, 10])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    functions = cpu_scheduled(model)
    assert [name for name in functions if "conv2d" in name or "clip" in name] == [
        "fused_conv2d_multiply_add_add1_tir_clip_multiply1_multiply2"
    ]
    assert not any(" / " in f.script() for f in functions.values())
    # the epilogue is computed as each register tile is written back: no block of its own
    (conv,) = (f for name, f in functions.items() if "conv2d" in name)
    assert block_names(conv)[1:] == [
        "pad_temp",
        "group_conv2d_nchw_init",
        "group_conv2d_nchw_update",
        "group_conv2d_nchw_intermediate_global",
    ]
    x = rng.standard_normal((1, c, 10, 10)).astype(np.float32)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]

    w32, xpad = (
        weight.astype(np.float32).astype(np.float64),
        np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1))),
    )
    z = sum(
        xpad[:, :, i : i + 10, j : j + 10] * w32[:, 0, i, j][None, :, None, None] for i in range(3) for j in range(3)
    )
    g, b, m, v = (a.astype(np.float32).astype(np.float64)[None, :, None, None] for a in (gamma, beta, mean, var))
    n = (z - m) / np.sqrt(v + 1e-5) * g + b
    expected = n * np.clip(n + 3, 0, 6) / 6
    # conv: 9 terms in any order; batch norm z * a + b: its gain a times that, plus u (2 |z a| + |b| + |n|)
    # (AffineBatchNorm's bound); HardSwish: slope at most 1.5, plus its own three roundings and the
    # reciprocal of 6's.
    conv_error = 2 * 13 * u * 9 * np.abs(x).max() * np.abs(w32).max()
    gain = np.abs(g / np.sqrt(v + 1e-5)).max()
    shift = np.abs(b - m * g / np.sqrt(v + 1e-5)).max()
    norm_error = gain * conv_error + u * (2 * gain * np.abs(z).max() + shift + np.abs(n).max())
    bound = 1.5 * norm_error + u * (3 * (np.abs(n).max() + 3) + 3 * np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


def test_transcendentals_take_the_fast_forms_within_their_error_bound():
    """tanh / erf / exp / sigmoid run TVM's fast polynomial forms (vectorised, ~15x faster here than libm
    calls per element). Their contract, checked on 400k points against float64: tanh and erf within 4
    ulp of 1.0 (2^-21) absolutely, exp within 2 ulp (2^-22) relatively, sigmoid (``1 / (1 + exp(-x))``
    over the fast exp) within 2^-22 + 2 · 2^-24 relatively (the exp's error, the add's and the
    division's rounding); no libm call is left in any of them."""
    x = np.concatenate([np.linspace(-12, 12, 200_001), np.random.default_rng(0).standard_normal(199_999) * 3])
    x = x.astype(np.float32).reshape(400, 1000)
    model = unary_model(["Tanh", "Erf", "Exp", "Sigmoid"], x.shape)
    functions = cpu_scheduled(model)
    assert {"fast_tanh", "fast_erf", "fast_exp"} <= set(functions)
    assert not any("T.exp(" in f.script() or "T.sigmoid(" in f.script() for f in functions.values())
    imported = import_onnx(model)
    out = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})
    wide = x.astype(np.float64)
    erf = np.vectorize(math.erf)(wide)
    sigmoid = 1 / (1 + np.exp(-wide))
    assert np.abs(out["y_tanh"] - np.tanh(wide)).max() <= 2.0**-21
    assert np.abs(out["y_erf"] - erf).max() <= 2.0**-21
    assert (np.abs(out["y_exp"] - np.exp(wide)) / np.exp(wide)).max() <= 2.0**-22
    assert (np.abs(out["y_sigmoid"] - sigmoid) / sigmoid).max() <= 2.0**-22 + 2 * 2.0**-24


def test_an_lpbq_conv_and_its_activation_run_as_one_function():
    """A 1x1 conv, LPBQ weight-only (the x86 dense kernel over its NHWC pixels), then ReLU: the reshape
    back to the conv's layout moves below the ReLU (SinkReshape), which fuses into the kernel's
    function (NarrowFusedEpilogues, FuseTIR) and is computed in the kernel's output block
    (KernelEpilogue), with no block of its own. Within the summation-order bound of ``sim.run``."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["z"]), helper.make_node("Relu", ["z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48, 5, 7])],
        [
            numpy_helper.from_array(rng.standard_normal((48, 64, 1, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=32)
    sim.compute_encodings()
    detached, _ = detach_params(lower(sim, "cpu", "weight-only"))
    mod = CPU.pipeline()(detached)
    (kernel,) = (f for name, f in prim_funcs(mod).items() if "lpbq_dense_x86" in name)
    assert block_names(kernel)[1:] == ["W", "Acc_init", "Acc_update", "y"]
    assert "T.max(" in kernel.script()  # the ReLU, in the output block
    x = {"x": rng.standard_normal((1, 64, 5, 7)).astype(np.float32)}
    actual = compile_model(sim, "cpu", "weight-only").run(x)["y"]
    assert_float_close(actual, sim.run(x)["y"], simulation_bound(sim, x, terms=[64]))


def test_a_function_tvms_reduction_rule_cannot_schedule_still_compiles():
    """AveragePool -> Dropout whose mask nothing reads (Inception v1's head): one fused function with a
    second output block, on which dlight's CPU reduction rule fails in ``compute_at``; the pipeline
    leaves that function to TVM's plain loops."""
    nodes = [
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[7, 7], pads=[0, 0, 1, 1]),
        helper.make_node("Dropout", ["pooled"], ["dropped", "mask"], ratio=0.4),
        helper.make_node("Relu", ["dropped"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    x = np.random.default_rng(0).standard_normal((1, 64, 6, 6)).astype(np.float32)
    (y,) = compile_model(QuantizationSimModel(model), "cpu", "fp32").run({"x": x}).values()
    # the padded 7 x 7 window averages the 36 values (ONNX excludes pads by default): a 36-term sum
    # in another order, then the division by 36, 2 (36 + 1) u of sum |x| / 36
    exact = np.maximum(x.astype(np.float64).mean(axis=(2, 3), keepdims=True), 0)
    bound = 2 * (36 + 1) * UNIT_ROUNDOFF * np.abs(x).mean(axis=(2, 3), keepdims=True)
    assert (np.abs(y - exact) <= bound).all()
