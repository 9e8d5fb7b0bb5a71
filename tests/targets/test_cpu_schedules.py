"""Default CPU schedules (RegisterTiled, Elementwise): applied where they should be, and still correct
on the shapes that select each of their branches (width-1 conv, 1x1 stride-1 conv, tails, matmul)."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
import tvm
from model_builders import UNIT_ROUNDOFF, assert_float_close, ort_run, simulation_bound
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline
from tvm.relax.frontend import detach_params
from tvm.s_tir import dlight

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.compiler import build, lower
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.channels_last import ChannelsLast
from lpbq_tvm.targets import get_target
from lpbq_tvm.targets.cpu_schedules import Elementwise, RegisterTiled, _register_tile, _vector_lanes, cpu_pipeline


def _model(op: str, x_shape, w_shape, attrs=None):
    """``y = hardswish(op(x, w) + 0.5)``: the op, then an elementwise epilogue of its own function."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(op, ["x", "w"], ["z"], name="layer", **(attrs or {})),
        helper.make_node("Add", ["z", "half"], ["a"]),
        helper.make_node("HardSwish", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])],
        [
            numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
            numpy_helper.from_array(np.float32(0.5), "half"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


CASES = {
    "conv3x3_width7_tail": ("Conv", (1, 16, 7, 7), (24, 16, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv1x1_56_wide": ("Conv", (1, 32, 8, 56), (40, 32, 1, 1), {}),
    "conv_width1_column": ("Conv", (2, 8, 50, 1), (12, 8, 5, 1), {"strides": [2, 1]}),
    "conv1d": ("Conv", (1, 8, 33), (6, 8, 3), {}),
    "depthwise": ("Conv", (1, 12, 10, 10), (12, 1, 3, 3), {"group": 12, "pads": [1, 1, 1, 1]}),
    "matmul_3d": ("MatMul", (2, 9, 40), (40, 30), {}),
    "matmul_packed_weight": ("MatMul", (16, 320), (320, 1024), {}),  # 1.3 MB weight, 4 row tiles
}


@pytest.mark.parametrize("name", CASES)
def test_scheduled_ops_match_onnxruntime(name):
    op, x_shape, w_shape, attrs = CASES[name]
    model = _model(op, x_shape, w_shape, attrs)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    expected = ort_run(model, {"x": x})["y"]
    # A dot product of K terms in another order: |error| <= 2(K+4)u sum|x||w| <= 2(K+4)u K max|x| max|w|,
    # then hardswish, whose slope is at most 1.5.
    terms = int(np.prod(w_shape[1:])) if op == "Conv" else w_shape[0]
    weight = numpy_helper.to_array(model.graph.initializer[0])
    bound = 1.5 * 2 * (terms + 4) * UNIT_ROUNDOFF * terms * np.abs(x).max() * np.abs(weight).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


def test_rules_schedule_the_conv_and_its_epilogue():
    op, x_shape, w_shape, attrs = CASES["conv3x3_width7_tail"]
    target = get_target("cpu").tvm_target()
    with target:
        mod = tvm.transform.Sequential(
            [*pipeline.legalize_passes(target), dlight.ApplyDefaultSchedule(RegisterTiled(), Elementwise())]
        )(import_onnx(_model(op, x_shape, w_shape, attrs)).mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert funcs and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in funcs.values()), list(funcs)
    conv = next(f.script() for name, f in funcs.items() if "conv2d" in name)
    assert "T.parallel" in conv and "T.vectorized(T.int64(7))" in conv and "T.unroll(T.int64(8))" in conv


@pytest.mark.parametrize(("name", "packed"), [("matmul_packed_weight", True), ("matmul_3d", False)])
def test_matmul_packs_only_a_large_weight_read_by_several_row_tiles(name, packed):
    op, x_shape, w_shape, attrs = CASES[name]
    functions = _scheduled_functions(_model(op, x_shape, w_shape, attrs))
    matmul = next(f.script() for name, f in functions.items() if "matmul" in name)
    assert ('T.sblock("w_global")' in matmul) == packed, matmul


@pytest.mark.parametrize("prefix", ["", "lpbq_"])
def test_epilogue_runs_in_one_pass_except_in_lpbq_kernels(prefix):
    """``(x @ w) · 2 + 1``: the multiply is computed inline into the add (one pass over the output),
    unless the blocks are a generic LPBQ kernel's, whose multiply and add must round separately."""
    from tvm import te

    x, w = te.placeholder((8, 16), "float32", "x"), te.placeholder((16, 32), "float32", "w")
    i = te.reduce_axis((0, 16), "i")
    acc = te.compute((8, 32), lambda m, n: te.sum(x[m, i] * w[i, n], axis=i), name=f"{prefix}acc")
    scaled = te.compute((8, 32), lambda m, n: acc[m, n] * 2.0, name=f"{prefix}scaled")
    out = te.compute((8, 32), lambda m, n: scaled[m, n] + 1.0, name=f"{prefix}out")
    sch = RegisterTiled().apply(te.create_prim_func([x, w, out]), get_target("cpu").tvm_target(), False)
    assert (f'T.sblock("{prefix}scaled")' in sch.mod["main"].script()) == bool(prefix)


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
    functions = _scheduled_functions(model)
    assert [name for name in functions if "conv2d" in name or "clip" in name] == [
        "fused_conv2d_multiply_add_add1_tir_clip_multiply1_multiply2"
    ]
    assert not any(" / " in f.script() for f in functions.values())
    # the epilogue is computed as each register tile is written back: no block of its own
    (conv,) = (f.script() for name, f in functions.items() if "conv2d" in name)
    assert re.findall(r'T\.sblock\("(\w+)"\)', conv)[1:] == [
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


@pytest.mark.parametrize(("extent", "lanes"), [(112, 16), (56, 14), (196, 14), (49, 7), (7, 7), (17, 1), (1, 1)])
def test_vector_lanes_divide_the_extent(extent, lanes):
    assert _vector_lanes(extent) == lanes


def _scheduled_functions(model: onnx.ModelProto) -> dict[str, tirx.PrimFunc]:
    """The PrimFuncs :func:`cpu_pipeline` compiles for ``model``, by name."""
    mod = cpu_pipeline(get_target("cpu").tvm_target())(import_onnx(model).mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _unary_model(ops: list[str], shape) -> onnx.ModelProto:
    nodes = [helper.make_node(op, ["x"], [f"y_{op.lower()}"], name=op) for op in ops]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(f"y_{op.lower()}", TensorProto.FLOAT, list(shape)) for op in ops],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_transcendentals_take_the_fast_forms_within_their_error_bound():
    """tanh / erf / exp run TVM's fast polynomial forms (vectorised, ~15x faster here than libm calls per
    element). Their contract, checked on 400k points against float64: tanh and erf within 4 ulp of 1.0
    (2^-21) absolutely, exp within 2 ulp (2^-22) relatively."""
    x = np.concatenate([np.linspace(-12, 12, 200_001), np.random.default_rng(0).standard_normal(199_999) * 3])
    x = x.astype(np.float32).reshape(400, 1000)
    model = _unary_model(["Tanh", "Erf", "Exp"], x.shape)
    assert {"fast_tanh", "fast_erf", "fast_exp"} <= set(_scheduled_functions(model))
    imported = import_onnx(model)
    out = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})
    wide = x.astype(np.float64)
    erf = np.vectorize(math.erf)(wide)
    assert np.abs(out["y_tanh"] - np.tanh(wide)).max() <= 2.0**-21
    assert np.abs(out["y_erf"] - erf).max() <= 2.0**-21
    assert (np.abs(out["y_exp"] - np.exp(wide)) / np.exp(wide)).max() <= 2.0**-22


def test_reductions_after_elementwise_ops_are_scheduled_and_exact():
    """``max(x · tanh(x), axis=-1)`` (magika's pooling): one fused function with a reduction, scheduled
    with the activation as its own vectorised stage and the maximum parallel over the rows it keeps;
    the maximum itself is exact, so the result equals onnxruntime's up to the elementwise part: tanh's
    bound above times |x|, plus the rounding of the product."""
    shape = (1, 64, 508)
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Mul", ["x", "t"], ["g"]),
        helper.make_node("ReduceMax", ["g"], ["y"], keepdims=0, axes=[-1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = (np.random.default_rng(3).standard_normal(shape) * 2).astype(np.float32)
    functions = _scheduled_functions(model)
    assert functions and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in functions.values())
    pooling = next(f.script() for name, f in functions.items() if "max" in name)
    assert "fast_tanh" in pooling and "T.vectorized" in pooling and "T.parallel(T.int64(64))" in pooling
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    bound = np.abs(x).max() * 2.0**-21 + np.abs(ort_run(model, {"x": x})["y"]).max() * UNIT_ROUNDOFF
    np.testing.assert_allclose(actual, ort_run(model, {"x": x})["y"], rtol=0, atol=bound)


@pytest.mark.parametrize(
    ("cpu", "rows", "width", "tile"),
    [
        ("znver3", 14, 256, (7, 16)),  # AVX2: 14 of 16 ymm accumulate; 7 pixels reuse each weight vector
        ("znver3", 24, 7, (8, 7)),  # NCHW rows of width 7: 8 channels x 7 lanes
        ("znver3", 32, 4096, (4, 16)),  # 6 rows do not divide 32; 8 x 16 would spill (16 ymm accumulators)
        ("znver3", 2040, 64, (6, 16)),  # 12 accumulators: the fewest loads per FMA within 14 ymm
        ("skylake-avx512", 14, 256, (7, 32)),  # AVX-512: 14 of 32 zmm
        ("skylake-avx512", 56, 64, (4, 64)),  # 16 zmm, 4 rows: fewer loads per FMA than 8 x 32
    ],
)
def test_register_tile_fits_the_register_file(cpu, rows, width, tile):
    assert _register_tile(rows, width, tvm.target.Target({"kind": "llvm", "mcpu": cpu})) == tile


def _nhwc_conv(x_shape, w_shape, groups, padding, stride=1) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        conv = relax.op.nn.conv2d(x, w, stride, [padding] * 4, groups=groups, data_layout="NHWC", kernel_layout="HWIO")
        bb.emit_func_output(bb.emit(conv))
    return bb.get()


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "groups", "padding", "stride"),
    [
        ((1, 7, 7, 64), (1, 1, 64, 48), 1, 0, 1),
        ((1, 9, 9, 8), (3, 3, 8, 16), 1, 1, 1),
        ((1, 10, 10, 16), (5, 5, 1, 16), 16, 2, 1),
        ((1, 20, 20, 3), (3, 3, 3, 8), 1, 1, 1),
        ((1, 13, 13, 16), (3, 3, 1, 16), 16, 1, 2),
        ((1, 20, 20, 3), (3, 3, 3, 8), 1, 1, 2),
    ],
    ids=["pointwise", "3x3", "depthwise", "3_channels", "depthwise_stride2", "3_channels_stride2"],
)
def test_nhwc_convs_tile_pixels_and_match_numpy(x_shape, w_shape, groups, padding, stride):
    """An NHWC conv's register tile takes its rows from the pixels of an image row (x), its lanes from
    the channels; the result is a dot product per output in another order (bound as above). A strided
    conv reads its padding in place, an unstrided one from a padded copy."""
    mod = _nhwc_conv(x_shape, w_shape, groups, padding, stride)
    target = get_target("cpu").tvm_target()
    scheduled = cpu_pipeline(target)(mod)
    conv_tir = next(f.script() for gv, f in scheduled.functions_items() if "conv2d" in gv.name_hint)
    assert "for xx_1 in T.unroll" in conv_tir and "for ff_1 in T.vectorized" in conv_tir
    assert ('T.sblock("pad_temp")' in conv_tir) == (padding > 0 and stride == 1)
    rng = np.random.default_rng(2)
    xv, wv = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
    actual = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(wv)).numpy()
    kh, kw, cin, cout = w_shape
    padded = np.pad(xv.astype(np.float64), [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    if groups == 1:
        expected = np.einsum("nyxcij,ijcf->nyxf", windows, wv.astype(np.float64))
    else:
        expected = np.einsum("nyxcij,ijc->nyxc", windows, wv[:, :, 0, :].astype(np.float64))
    terms = kh * kw * cin
    bound = 2 * (terms + 4) * UNIT_ROUNDOFF * terms * np.abs(xv).max() * np.abs(wv).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


def test_a_short_innermost_loop_is_fused_with_the_one_outside_it():
    """Padding a 3-channel NHWC image: the channel loop (3) is fused with the pixels of the row, so the
    parallel loop runs over the 22 padded rows instead of 22 x 22 pixels, and each vector is longer
    than 3 lanes (11, the largest divisor of 22 x 3 up to 16)."""
    scheduled = cpu_pipeline(get_target("cpu").tvm_target())(_nhwc_conv((1, 20, 20, 3), (3, 3, 3, 8), 1, 1))
    conv = next(f for gv, f in scheduled.functions_items() if "conv2d" in gv.name_hint)
    sch = s_tir.Schedule(conv)
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("pad_temp"))]
    kinds = [(int(loop.extent), tirx.ForKind(int(loop.kind))) for loop in loops]
    assert kinds == [(22, tirx.ForKind.PARALLEL), (6, tirx.ForKind.SERIAL), (11, tirx.ForKind.VECTORIZED)], kinds


def test_register_tiles_are_not_heap_allocated_per_tile():
    """TVM 0.27 allocates a local-scope buffer with TVMBackendAllocWorkspace: a local accumulator tile
    cost one allocation per tile inside the parallel loop (and lived in memory, not registers). No
    parallel task of a depthwise conv allocates."""
    target = get_target("cpu").tvm_target()
    executable = tvm.compile(
        _nhwc_conv((1, 14, 14, 16), (3, 3, 1, 16), 16, 1), target, relax_pipeline=cpu_pipeline(target)
    )
    llvm_ir = executable.mod.imports[0].inspect_source("ll")
    tasks = [f for f in re.split(r"\ndefine ", llvm_ir) if "@__tvm_parallel_lambda" in f.split("\n")[0]]
    assert tasks and not any("TVMBackendAllocWorkspace" in task for task in tasks)


def test_an_epilogue_that_broadcasts_the_conv_output_stays_a_pass_of_its_own():
    """Squeeze-excite, ``h · hardsigmoid(conv1x1(relu(avgpool(h))))`` with ``h = conv1x1(x)``, batch 2:
    the epilogue reads the excite conv's [2, 1, 1, C] output at every pixel of h, so it cannot run in
    that conv's write-back (TVM 0.27 fails inside reverse_compute_inline on it); it compiles and
    matches onnxruntime."""
    rng = np.random.default_rng(5)
    c = 16
    w0, w1 = (rng.standard_normal((c, c, 1, 1)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["a"]),
        helper.make_node("Relu", ["a"], ["p"]),
        helper.make_node("Conv", ["p", "w1"], ["z"]),
        helper.make_node("HardSigmoid", ["z"], ["g"]),
        helper.make_node("Mul", ["h", "g"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 7, 7])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((2, c, 7, 7)).astype(np.float32)
    imported = import_onnx(model)
    nhwc = ChannelsLast()(imported.mod)  # as the cpu target compiles it: convs tile pixels x channels
    actual = build(nhwc, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    # h: a c-term dot product in another order; its mean over 49 pixels (within 50u) and the excite
    # conv likewise; HardSigmoid's slope 0.2 and two roundings; the product with h and its rounding
    u, w_max = UNIT_ROUNDOFF, max(np.abs(w0).max(), np.abs(w1).max())
    h_max = c * w_max * np.abs(x).max()
    h_error = 2 * c * u * h_max
    pooled_error = h_error + 50 * u * h_max
    excite_error = c * w_max * pooled_error + 2 * c * u * c * w_max * h_max
    bound = h_max * (0.2 * excite_error + 2 * u) + h_error + u * h_max
    np.testing.assert_allclose(actual, ort_run(model, {"x": x})["y"], rtol=0, atol=bound)


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
    mod = cpu_pipeline(get_target("cpu").tvm_target())(detached)
    (kernel,) = (f.script() for gv, f in mod.functions_items() if "lpbq_dense_x86" in gv.name_hint)
    assert re.findall(r'T\.sblock\("(\w+)"\)', kernel)[1:] == ["W", "Acc_init", "Acc_update", "y"]
    assert "T.max(" in kernel  # the ReLU, in the output block
    x = {"x": rng.standard_normal((1, 64, 5, 7)).astype(np.float32)}
    actual = lpbq_tvm.compile(sim, "cpu", "weight-only").run(x)["y"]
    assert_float_close(actual, sim.run(x)["y"], simulation_bound(sim, x, terms=[64]))
