"""FoldConstantsInNumpy: the value-preserving ops on constants fold to exactly what TVM computes for
them, chains included; calls on run-time values or of symbolic shape stay."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.fold_constants_in_numpy import FoldConstantsInNumpy

PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied
FOLDED_OPS = {"relax.isnan", "relax.isinf", "relax.isfinite", "relax.where", "relax.reshape", "relax.expand_dims",
              "relax.squeeze", "relax.permute_dims", "relax.broadcast_to"}  # fmt: skip

BOUNDS = np.array([np.nan, -0.0, np.inf, 1.5, -np.inf, 3.4e38], np.float32)
BIAS = np.arange(-3, 3, dtype=np.int64)
HALVES = np.array([[1e-7, -65504.0, np.nan], [0.1, 2.0, -0.0]], np.float16)
FLAGS = np.array([True, False, True])


def _constant_chains() -> tvm.IRModule:
    """A Clip's NaN guard on both bounds, a bias reshape, and each other folded op, on constants."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")):
            with R.dataflow():
                bounds = R.const(BOUNDS)
                low = R.where(R.isnan(bounds), R.const(-np.inf, "float32"), bounds)
                high = R.where(R.isnan(bounds), R.const(np.inf, "float32"), bounds)
                bias = R.reshape(R.const(BIAS), R.shape([6, 1, 1]))
                halves = R.permute_dims(R.const(HALVES), axes=[1, 0])
                flags = R.broadcast_to(R.expand_dims(R.const(FLAGS), axis=[0]), R.shape([2, 3]))
                finite = R.squeeze(R.expand_dims(R.isfinite(bounds), axis=[1]), axis=[1])
                infinite = R.isinf(R.reshape(bounds, R.shape([2, 3])))
                out = (x, low, high, bias, halves, flags, finite, infinite)
                R.output(out)
            return out

    return Module


def _op_calls(mod: tvm.IRModule) -> list[str]:
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            calls.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


def test_folded_values_equal_tvm_s_own_bit_for_bit():
    """Every call of the chains folds, and the module returns the bits TVM computes from the unfolded one."""
    mod = _constant_chains()
    folded = FoldConstantsInNumpy()(mod)
    assert not FOLDED_OPS & set(_op_calls(folded))
    x = {"x": np.ones((2, 3), np.float32)}
    ours, theirs = build(folded, pipeline=PLAIN).run(x), build(mod, pipeline=PLAIN).run(x)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert ours[name].tobytes() == value.tobytes(), name  # bit for bit, NaNs and signed zeros included
    low, high = ours["output1"], ours["output2"]
    assert low[0] == -np.inf and high[0] == np.inf and np.signbit(low[1])


def test_calls_on_run_time_values_or_of_symbolic_shape_stay():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((3,), "float32"), y: R.Tensor(("n",), "float32")):
            n = T.int64()
            with R.dataflow():
                guarded = R.where(R.isnan(x), R.const(0.0, "float32"), x)
                shaped = R.broadcast_to(R.const(np.float32(2.0)), R.shape([n]))
                out = R.add(shaped, y)
                R.output(guarded, out)
            return (guarded, out)

    tvm.ir.assert_structural_equal(FoldConstantsInNumpy()(Before), Before)
