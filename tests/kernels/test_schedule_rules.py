"""The schedule rules (RegisterTiled, Elementwise, KernelEpilogue): applied where they should be, correct on
the shapes that select each of their branches (width-1 conv, 1x1 stride-1 conv, tails, matmul, NHWC)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from ir import block_names, prim_funcs
from kernel_cases import rowwise_activations
from model_builders import UNIT_ROUNDOFF, cpu_scheduled, epilogue_model, nhwc_conv, ort_run
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, s_tir, te, tirx
from tvm.relax.backend.cpu_generic import pipeline
from tvm.s_tir import dlight

from lpbq_tvm.calibration import RowwiseEncoding
from lpbq_tvm.compiler import build
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.kernels.generic import row_encodings
from lpbq_tvm.kernels.interface import SEPARATE_ROUNDING
from lpbq_tvm.kernels.schedule_rules import (
    MIN_PARALLEL,
    Elementwise,
    LaneReduction,
    RegisterTiled,
    _vector_lanes,
    register_tile,
)
from lpbq_tvm.kernels.x86.isa import register_file as x86_register_file
from lpbq_tvm.passes.channels_last import ChannelsLast
from lpbq_tvm.targets import get_target
from lpbq_tvm.targets.aarch64 import NEON

CPU = get_target("cpu")


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
    model = epilogue_model(op, x_shape, w_shape, attrs)
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
    target = CPU.tvm_target()
    with target:
        mod = tvm.transform.Sequential(
            [
                *pipeline.legalize_passes(target),
                dlight.ApplyDefaultSchedule(RegisterTiled(CPU.register_file(target)), Elementwise()),
            ]
        )(import_onnx(epilogue_model(op, x_shape, w_shape, attrs)).mod)
    funcs = prim_funcs(mod)
    assert funcs and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in funcs.values()), list(funcs)
    conv = next(f.script() for name, f in funcs.items() if "conv2d" in name)
    assert "T.parallel" in conv and "T.vectorized(T.int64(7))" in conv and "T.unroll(T.int64(8))" in conv


@pytest.mark.parametrize(("name", "packed"), [("matmul_packed_weight", True), ("matmul_3d", False)])
def test_matmul_packs_only_a_large_weight_read_by_several_row_tiles(name, packed):
    op, x_shape, w_shape, attrs = CASES[name]
    functions = cpu_scheduled(epilogue_model(op, x_shape, w_shape, attrs))
    matmul = next(f.script() for name, f in functions.items() if "matmul" in name)
    assert ('T.sblock("w_global")' in matmul) == packed, matmul


@pytest.mark.parametrize("separate", [False, True])
def test_epilogue_runs_in_one_pass_unless_its_roundings_are_separate(separate):
    """``(x @ w) · 2 + 1``: the multiply is computed inline into the add (one pass over the output),
    unless the blocks are marked SEPARATE_ROUNDING (a generic LPBQ kernel's epilogue), whose multiply
    and add must round separately."""
    from tvm import te

    marked = {SEPARATE_ROUNDING: 1} if separate else {}
    x, w = te.placeholder((8, 16), "float32", "x"), te.placeholder((16, 32), "float32", "w")
    i = te.reduce_axis((0, 16), "i")
    acc = te.compute((8, 32), lambda m, n: te.sum(x[m, i] * w[i, n], axis=i), name="acc")
    scaled = te.compute((8, 32), lambda m, n: acc[m, n] * 2.0, name="scaled", attrs=marked)
    out = te.compute((8, 32), lambda m, n: scaled[m, n] + 1.0, name="out", attrs=marked)
    target = CPU.tvm_target()
    sch = RegisterTiled(CPU.register_file(target)).apply(te.create_prim_func([x, w, out]), target, False)
    assert ("scaled" in block_names(sch.mod["main"])) == separate


@pytest.mark.parametrize(("extent", "lanes"), [(112, 16), (56, 14), (196, 14), (49, 7), (7, 7), (17, 1), (1, 1)])
def test_vector_lanes_divide_the_extent(extent, lanes):
    assert _vector_lanes(extent) == lanes


ZEN3, SKYLAKE = (
    x86_register_file(tvm.target.Target({"kind": "llvm", "mcpu": c})) for c in ("znver3", "skylake-avx512")
)


@pytest.mark.parametrize(
    ("registers", "rows", "width", "tile"),
    [
        (ZEN3, 14, 256, (7, 16)),  # AVX2: 14 of 16 ymm accumulate; 7 pixels reuse each weight vector
        (ZEN3, 24, 7, (8, 7)),  # NCHW rows of width 7: 8 channels x 7 lanes
        (ZEN3, 32, 4096, (4, 16)),  # 6 rows do not divide 32; 8 x 16 would spill (16 ymm accumulators)
        (ZEN3, 2040, 64, (6, 16)),  # 12 accumulators: the fewest loads per FMA within 14 ymm
        (SKYLAKE, 14, 256, (7, 32)),  # AVX-512: 14 of 32 zmm
        (SKYLAKE, 56, 64, (4, 64)),  # 16 zmm, 4 rows: fewer loads per FMA than 8 x 32
        (NEON, 14, 256, (7, 8)),  # NEON: 7 rows x 2 q-registers of 4 floats, within 24 of 32
    ],
    ids=str,
)
def test_register_tile_fits_the_register_file(registers, rows, width, tile):
    assert register_tile(rows, width, registers) == tile


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
    mod = nhwc_conv(x_shape, w_shape, groups, padding, stride)
    target = CPU.tvm_target()
    scheduled = CPU.pipeline(target)(mod)
    conv_tir = next(f.script() for name, f in prim_funcs(scheduled).items() if "conv2d" in name)
    assert "for xx_1 in T.unroll" in conv_tir and "for ff_1 in T.vectorized" in conv_tir
    assert ('T.sblock("pad_temp")' in conv_tir) == (padding > 0 and stride == 1)
    rng = np.random.default_rng(2)
    xv, wv = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(mod, target, relax_pipeline=CPU.pipeline(target)), tvm.cpu())
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
    parallel loop runs over the 96 padded rows instead of 96 x 96 pixels, and each vector is longer
    than 3 lanes (16, the largest divisor of 96 x 3 up to 16)."""
    scheduled = CPU.pipeline()(nhwc_conv((1, 94, 94, 3), (3, 3, 3, 8), 1, 1))
    conv = next(f for name, f in prim_funcs(scheduled).items() if "conv2d" in name)
    sch = s_tir.Schedule(conv)
    loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("pad_temp"))]
    kinds = [(int(loop.extent), tirx.ForKind(int(loop.kind))) for loop in loops]
    assert kinds == [(96, tirx.ForKind.PARALLEL), (18, tirx.ForKind.SERIAL), (16, tirx.ForKind.VECTORIZED)], kinds


@pytest.mark.parametrize(("shape", "parallel"), [((1, 1, 576), False), ((1, 9, 1024), False), ((1, 16, 1024), True)])
def test_blocks_run_parallel_from_min_parallel_iterations(shape, parallel):
    """A residual add (``x + x · y``): parallel from ``MIN_PARALLEL`` (16 K) elements; below, where starting
    the thread pool costs more than the work (a decoder step's add of one token, 576 values), one serial
    vectorised loop. Either way the same values, up to the rounding of the product."""
    nodes = [helper.make_node("Mul", ["x", "y"], ["p"]), helper.make_node("Add", ["x", "p"], ["z"])]
    info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name in "xyz"]
    graph = helper.make_graph(nodes, "add", info[:2], info[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (script,) = (f.script() for f in cpu_scheduled(model).values())
    assert ("T.parallel" in script) == parallel and "T.vectorized" in script, script
    rng = np.random.default_rng(5)
    x, y = (rng.standard_normal(shape).astype(np.float32) for _ in "xy")
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x, "y": y})["z"]
    # a multiply and an add: numpy rounds the product, LLVM may fuse the two (one rounding of the product)
    bound = UNIT_ROUNDOFF * (np.abs(x * y) + 2 * np.abs(x + x * y))
    assert np.all(np.abs(actual - (x + x * y)) <= bound)


@pytest.mark.parametrize(("keys", "parallel"), [(16, False), (512, True)])
def test_register_tiles_run_parallel_from_min_parallel_iterations(keys, parallel):
    """A decoder step's attention scores, ``q · kᵀ`` of [1, 3 heads, 3 queries, 64] by [1, 3, 64, keys]:
    at 16 keys, 9 K multiply-adds, one serial register-tiled loop nest (starting the thread pool's
    tasks would cost more than the work); at 512 keys, 295 K, parallel. Within ``(K + 2) u`` of the
    float64 product's magnitude either way."""
    q_shape, k_shape = (1, 3, 3, 64), (1, 3, 64, keys)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "k"], ["s"])],
        "scores",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in (("q", q_shape), ("k", k_shape))],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 3, 3, keys])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (matmul,) = (f.script() for name, f in cpu_scheduled(model).items() if "matmul" in name)
    assert "T.vectorized" in matmul and ("T.parallel" in matmul) == parallel, matmul
    rng = np.random.default_rng(keys)
    q, k = rng.standard_normal(q_shape).astype(np.float32), rng.standard_normal(k_shape).astype(np.float32)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"q": q, "k": k})["s"]
    wide = q.astype(np.float64) @ k.astype(np.float64)
    assert np.all(np.abs(actual - wide) <= (64 + 2) * UNIT_ROUNDOFF * (np.abs(q) @ np.abs(k)))


def test_register_tiles_are_not_heap_allocated_per_tile():
    """TVM 0.27 allocates a local-scope buffer with TVMBackendAllocWorkspace: a local accumulator tile
    cost one allocation per tile inside the parallel loop (and lived in memory, not registers). No
    parallel task of a depthwise conv allocates."""
    target = CPU.tvm_target()
    executable = tvm.compile(
        nhwc_conv((1, 14, 14, 16), (3, 3, 1, 16), 16, 1), target, relax_pipeline=CPU.pipeline(target)
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
    functions = cpu_scheduled(model)
    assert functions and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in functions.values())
    pooling = next(f.script() for name, f in functions.items() if "max" in name)
    assert "fast_tanh" in pooling and "T.vectorized" in pooling and "T.parallel(T.int64(64))" in pooling
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    bound = np.abs(x).max() * 2.0**-21 + np.abs(ort_run(model, {"x": x})["y"]).max() * UNIT_ROUNDOFF
    np.testing.assert_allclose(actual, ort_run(model, {"x": x})["y"], rtol=0, atol=bound)


@pytest.mark.parametrize("op", ["Greater", "Max"])
def test_scalar_functions_are_left_as_they_are(op):
    """A rank-0 elementwise function (a scalar comparison, as an If condition is) has no loop to
    parallelise or vectorise; it compiles and computes what it says (exactly: no rounding is involved)."""
    out_type = TensorProto.BOOL if op == "Greater" else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "three"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", out_type, [])],
        [numpy_helper.from_array(np.float32(3.0), "three")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    imported = import_onnx(model)
    compiled = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs)
    for value in (-2.5, 3.0, 7.25):
        expected = value > 3.0 if op == "Greater" else max(value, 3.0)
        assert compiled.run({"x": np.float32(value)})["y"] == expected


@pytest.mark.parametrize(
    ("batch", "heads", "keys", "split"),
    [
        (2, 9, 256, True),
        (2, 9, 100, False),
        (1, 9, 16, False),
        (16, 9, 256, True),
        (32, 9, 100, False),
        (1, 1, 4096, True),
    ],
)
def test_row_reductions_are_split_over_the_vector_lanes(batch, heads, keys, split):
    """Softmax over the last axis: with a row a multiple of the lanes (and two vectors long) its max and
    its sum each run as one vectorised partial result per lane, then a reduction of the lanes
    (LaneReduction, one row too); a row of 100 or 16 is reduced serially. Rows run parallel from
    ``MIN_PARALLEL`` iterations (a decoder step's 9 rows of 16 keys do not). Either way within the
    bound of float64 softmax: the fast exp's 2^-22 relative on each term and on their sum, the
    subtraction of the max (``|x - max| · u`` relative through exp), the sum's ``(n - 1) · u`` in any
    order, and the division's ``u``."""
    shape = (batch, heads, keys)
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (softmax,) = (f.script() for name, f in cpu_scheduled(model).items() if "softmax" in name)
    assert ("T_softmax_maxelem_rf" in softmax and "T_softmax_expsum_rf" in softmax) == split
    assert ("T.parallel" in softmax) == (np.prod(shape) >= MIN_PARALLEL), softmax
    x = (np.random.default_rng(7).standard_normal(shape) * 4).astype(np.float32)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    wide = x.astype(np.float64)
    shifted = wide - wide.max(axis=-1, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    u = UNIT_ROUNDOFF
    relative = 2 * 2.0**-22 + np.abs(shifted).max() * u + keys * u
    np.testing.assert_allclose(actual, expected, rtol=relative, atol=0)


@pytest.mark.parametrize("M", [1, 5])
def test_row_encodings_reduce_over_the_lanes_bit_exactly(M):
    """Mode w4a8-dynamic's row-encoding function has two outputs of one value per row (scale, zero
    point): LaneReduction still takes each row's minimum and maximum as per-lane vectors, then across
    the lanes, and the encodings equal RowwiseEncoding's bit for bit (a minimum or maximum is exact in
    any order)."""
    K = 192
    x = te.placeholder((M, K), "float32", "x")
    func = te.create_prim_func([x, *row_encodings(x)])
    target = get_target("cpu").tvm_target()
    with target:
        sch = LaneReduction().apply(func, target, False)
    script = sch.mod["main"].script()
    assert "row_min_rf" in script and "row_max_rf" in script and "T.vectorized(" in script
    lib = tvm.compile(sch.mod["main"], target)
    data = rowwise_activations(M, K, np.random.default_rng(M))
    scales, zero_points = tvm.runtime.empty((M,), "float32"), tvm.runtime.empty((M,), "int32")
    lib["main"](tvm.runtime.tensor(data), scales, zero_points)
    encoding = RowwiseEncoding()
    np.testing.assert_array_equal(scales.numpy().view(np.int32), encoding.scales(data).reshape(M).view(np.int32))
    np.testing.assert_array_equal(zero_points.numpy(), encoding.zero_points(data).reshape(M))


def test_a_row_reduction_feeding_one_value_per_row_is_split_and_parallel():
    """An RMS norm's scale, ``1 / sqrt(mean(x²) + eps)`` per row (a reduction, then blocks of one value
    per row): the sum of squares split over the lanes, the rows parallel; within float64's value by
    the sum's ``(K - 1) u`` (positive terms, any order) and ``4 u`` for the mean, add, sqrt and division."""
    rows, K, eps = 96, 256, 1e-5  # 24 K iterations: parallel (MIN_PARALLEL)
    x = te.placeholder((rows, K), "float32", "x")
    k = te.reduce_axis((0, K), "k")
    squares = te.compute((rows,), lambda r: te.sum(x[r, k] * x[r, k], axis=k), name="squares")
    scale = te.compute(
        (rows,),
        lambda r: tirx.const(1.0, "float32") / tirx.sqrt(squares[r] / K + tirx.const(eps, "float32")),
        name="rms",
    )
    target = get_target("cpu").tvm_target()
    with target:
        sch = LaneReduction().apply(te.create_prim_func([x, scale]), target, False)
    script = sch.mod["main"].script()
    assert "squares_rf" in script and "T.parallel(" in script and "T.vectorized(" in script
    data = np.random.default_rng(3).standard_normal((rows, K)).astype(np.float32)
    out = tvm.runtime.empty((rows,), "float32")
    tvm.compile(sch.mod["main"], target)["main"](tvm.runtime.tensor(data), out)
    wide = data.astype(np.float64)
    expected = 1 / np.sqrt((wide * wide).mean(axis=1) + eps)
    np.testing.assert_allclose(out.numpy(), expected, rtol=(K + 3) * UNIT_ROUNDOFF, atol=0)


@pytest.mark.parametrize(("rows", "K"), [(256, 64), (1, 576)])
def test_a_kept_dims_norm_is_scheduled_per_row_not_per_element(rows, K):
    """An RMS norm from ONNX (ReduceMean with keepdims, then elementwise over the full rows): its last
    block has the reduction's rank minus one loops but is not one value per row, so it must not be
    taken for one (that recomputed the row's sum for every element, 4 ms a call at 256 x 576). Its
    function runs parallel over 256 rows; a decoder step's one row of 576 (under ``MIN_PARALLEL``)
    serially. Either way each row's sum is split over the lanes (dlight's rule, which scheduled kept-dims
    norms before, took a one-row norm's 576 elements for rows and summed the row again for each).
    Within the derived bound."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["squares"]),
        helper.make_node("ReduceMean", ["squares"], ["mean"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, K])],
        [numpy_helper.from_array(np.array(1e-5, np.float32), "eps")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (norm,) = (f.script() for name, f in cpu_scheduled(model).items() if "mean" in name)
    assert "lv_red_rf" in norm, norm
    if rows * K >= MIN_PARALLEL:
        assert re.search(rf"T\.parallel\(T\.int64\({rows}\)\)", norm), norm
    else:
        assert "T.parallel" not in norm and "T.vectorized" in norm, norm
    x = np.random.default_rng(4).standard_normal((1, rows, K)).astype(np.float32)
    imported = import_onnx(model)
    actual = build(imported.mod, inputs=imported.inputs, outputs=imported.outputs).run({"x": x})["y"]
    wide = x.astype(np.float64)
    expected = wide / np.sqrt((wide * wide).mean(axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(actual, expected, rtol=(K + 4) * UNIT_ROUNDOFF, atol=0)
