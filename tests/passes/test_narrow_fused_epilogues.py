"""NarrowFusedEpilogues: the ops FuseOps grouped with a scheduled int32 kernel get int32 copies, so
FuseTIR can merge the group; the same op outside such a group keeps its int64 original."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import prim_funcs
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from lpbq_tvm.kernels import x86
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.passes.narrow_fused_epilogues import NarrowFusedEpilogues
from lpbq_tvm.targets import get_target


def _module(scheduled: bool) -> tvm.IRModule:
    """``(fused(x), relu(x))`` where ``fused`` groups a kernel (scheduled or not, int32 indices) with ``relu``
    (int64 indices, as LegalizeOps writes it)."""
    attrs = {"op_pattern": 4, "tirx.is_scheduled": True} if scheduled else {"op_pattern": 4}

    @I.ir_module
    class Module:
        @T.prim_func(private=True, s_tir=True)
        def kernel(x: T.Buffer((4, 8), "float32"), y: T.Buffer((4, 8), "float32")):
            T.func_attr(attrs)
            for i, j in T.grid(4, 8):
                with T.sblock("y"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj] * T.float32(2)

        @T.prim_func(private=True, s_tir=True)
        def relu(a: T.Buffer((T.int64(4), T.int64(8)), "float32"), b: T.Buffer((T.int64(4), T.int64(8)), "float32")):
            T.func_attr({"op_pattern": 0})
            for i, j in T.grid(T.int64(4), T.int64(8)):
                with T.sblock("relu"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = T.max(a[vi, vj], T.float32(0))

        @R.function(private=True)
        def fused(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"Primitive": True})
            cls = Module
            with R.dataflow():
                y = R.call_tir(cls.kernel, (x,), out_ty=R.Tensor((4, 8), "float32"))
                z = R.call_tir(cls.relu, (y,), out_ty=R.Tensor((4, 8), "float32"))
                R.output(z)
            return z

        @R.function
        def main(x: R.Tensor((4, 8), "float32")):
            cls = Module
            with R.dataflow():
                a = cls.fused(x)
                b = R.call_tir(cls.relu, (x,), out_ty=R.Tensor((4, 8), "float32"))
                out = (a, b)
                R.output(out)
            return out

    return Module


def test_the_group_of_a_scheduled_kernel_calls_an_int32_copy_of_its_epilogue():
    """The relu grouped with the scheduled kernel is replaced, in that group only, by a copy with int32
    indices; the relu of ``x`` outside the group keeps the int64 original."""
    before = _module(scheduled=True)

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def kernel(x: T.Buffer((4, 8), "float32"), y: T.Buffer((4, 8), "float32")):
            T.func_attr({"op_pattern": 4, "tirx.is_scheduled": True})
            for i, j in T.grid(4, 8):
                with T.sblock("y"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    y[vi, vj] = x[vi, vj] * T.float32(2)

        @T.prim_func(private=True, s_tir=True)
        def relu(a: T.Buffer((T.int64(4), T.int64(8)), "float32"), b: T.Buffer((T.int64(4), T.int64(8)), "float32")):
            T.func_attr({"op_pattern": 0})
            for i, j in T.grid(T.int64(4), T.int64(8)):
                with T.sblock("relu"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = T.max(a[vi, vj], T.float32(0))

        @T.prim_func(private=True, s_tir=True)
        def relu_int32(a: T.Buffer((4, 8), "float32"), b: T.Buffer((4, 8), "float32")):
            T.func_attr({"op_pattern": 0})
            for i, j in T.grid(4, 8):
                with T.sblock("relu"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    b[vi, vj] = T.max(a[vi, vj], T.float32(0))

        @R.function(private=True)
        def fused(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"Primitive": True})
            cls = Expected
            with R.dataflow():
                y = R.call_tir(cls.kernel, (x,), out_ty=R.Tensor((4, 8), "float32"))
                z = R.call_tir(cls.relu_int32, (y,), out_ty=R.Tensor((4, 8), "float32"))
                R.output(z)
            return z

        @R.function
        def main(x: R.Tensor((4, 8), "float32")):
            cls = Expected
            with R.dataflow():
                a = cls.fused(x)
                b = R.call_tir(cls.relu, (x,), out_ty=R.Tensor((4, 8), "float32"))
                out = (a, b)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(NarrowFusedEpilogues()(before), Expected)


def test_a_group_without_a_scheduled_kernel_is_left_unchanged():
    before = _module(scheduled=False)
    tvm.ir.assert_structural_equal(NarrowFusedEpilogues()(before), before)


M, N, K, B = 32, 64, 64, 32


def _grouped(narrow: bool) -> tvm.IRModule:
    """``relu(kernel(x))`` and ``relu(x)``, legalized and grouped by FuseOps, [narrowed]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    qw = relax.Var("qw", relax.TensorType((1, K // 8, 64), "uint32"))
    kw = relax.Var("kw", relax.TensorType((1, 1, 64), "uint8"))
    s = relax.Var("s", relax.TensorType((N,), "float32"))
    with bb.function("main", [x, qw, kw, s]):
        with bb.dataflow():
            kernel = x86.weight_only_dense(M, N, K, B, target=get_target("cpu").tvm_target()).without_attr(
                "global_symbol"
            )
            kernel = bb.add_func(kernel, "kernel")
            y = bb.emit(relax.call_tir(kernel, [x, qw, kw, s], relax.TensorType((M, N), "float32")))
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.nn.relu(y)), bb.emit(relax.op.nn.relu(x))]))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps()]
    return tvm.transform.Sequential(passes + ([NarrowFusedEpilogues()] if narrow else []))(bb.get())


def _int64_indexed(func: tirx.PrimFunc) -> bool:
    return "T.int64(" in func.script()


def test_fuse_tir_merges_the_kernel_and_its_narrowed_epilogue():
    grouped = _grouped(narrow=True)
    assert not _int64_indexed(grouped["relu_int32"])
    assert _int64_indexed(grouped["relu"])  # relu(x), outside the group
    fused = relax.transform.FuseTIR()(grouped)
    (merged,) = (f for name, f in prim_funcs(fused).items() if name.startswith("fused_kernel"))
    assert "T.max(" in merged.script()

    rng = np.random.default_rng(0)
    q, k = rng.integers(-8, 8, (N, K)), rng.integers(1, 17, (N, K // B))
    qw, kw = x86.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    x = rng.standard_normal((M, K)).astype(np.float32)
    s = rng.uniform(0.5, 1.5, N).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(fused, target=get_target("cpu").tvm_target()), tvm.cpu())
    kernel_relu, x_relu = vm["main"](*(tvm.runtime.tensor(a) for a in (x, qw, kw, s)))
    np.testing.assert_array_equal(x_relu.numpy(), np.maximum(x, 0))
    w = (q * np.repeat(k, B, axis=1)).T
    reference = (x.astype(np.float64) @ w) * s
    # K products summed in float32 in some order, then scaled: (K + 2) roundings of the magnitudes
    bound = (K + 2) * 2.0**-24 * (np.abs(x) @ np.abs(w)) * s
    assert (np.abs(kernel_relu.numpy() - np.maximum(reference, 0)) <= bound).all()


def test_without_it_fuse_tir_rejects_the_group():
    with pytest.raises(tvm.error.InternalError, match="Inconsistent buffers"):
        relax.transform.FuseTIR()(_grouped(narrow=False))
