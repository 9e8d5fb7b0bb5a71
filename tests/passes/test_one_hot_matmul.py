"""OneHotMatMul: ``matmul(astype(equal(x, arange(n))), w)`` becomes a row lookup of ``w`` that equals the
matmul bit for bit, zero rows for indices outside ``0..n-1``; the batch axis may be symbolic; other
equal-matmuls stay."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import relax_calls
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.one_hot_matmul import OneHotMatMul

N, F = 9, 5
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


def _module(classes: np.ndarray, x_dtype: str = "int32", w_rows: int | str = N, batch: int | str = "b") -> tvm.IRModule:
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((batch, 6, 1), x_dtype), w: R.Tensor((w_rows, F), "float32")):
            with R.dataflow():
                one_hot = R.astype(R.equal(x, R.const(classes)), "float32")
                out = R.matmul(one_hot, w)
                R.output(out)
            return out

    return Module


def _ops(mod: tvm.IRModule) -> set[str]:
    return {call.op.name for call in relax_calls(mod)}


ARANGE = np.arange(N, dtype=np.int32)


def rewritten_module(classes: np.ndarray) -> tvm.IRModule:
    return OneHotMatMul()(_module(classes, batch=2))


def test_a_one_hot_matmul_becomes_a_row_lookup():
    """``take`` of the rows the indices name (clipped), and zero rows where an index is outside 0..n-1;
    the one-hot tensor is gone."""

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("b", 6, 1), "int32"), w: R.Tensor((N, F), "float32")):
            b = T.int64()
            with R.dataflow():
                indices = R.squeeze(x, axis=[-1])
                inside = R.logical_and(
                    R.greater_equal(indices, R.const(0, "int32")), R.less(indices, R.const(N, "int32"))
                )
                outside_is_zero = R.expand_dims(inside, axis=[-1])
                rows = R.take(w, indices, axis=0, mode="clip")
                out: R.Tensor((b, 6, F), "float32") = R.where(outside_is_zero, rows, R.const(0.0))
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(OneHotMatMul()(_module(ARANGE)), Expected)


@pytest.mark.parametrize("classes", [ARANGE, ARANGE.reshape(1, 1, N)], ids=["vector", "magika_shape"])
def test_a_one_hot_matmul_becomes_a_lookup_equal_to_the_matmul(classes):
    rewritten = OneHotMatMul()(_module(classes))
    assert "relax.take" in _ops(rewritten) and not {"relax.matmul", "relax.equal"} & _ops(rewritten)
    rng = np.random.default_rng(0)
    x = rng.integers(-2, N + 3, (2, 6, 1)).astype(np.int32)  # some outside 0..N-1: all-zero one-hot rows
    x[0, :3, 0] = [-1, N, N + 2]
    w = rng.standard_normal((N, F)).astype(np.float32)
    got = build(rewritten_module(classes), pipeline=PLAIN).run({"x": x, "w": w})["output0"]
    one_hot = (x == ARANGE).astype(np.float32)
    np.testing.assert_array_equal(got, one_hot @ w)
    assert not got[0, :3].any()


@pytest.mark.parametrize(
    ("classes", "x_dtype"),
    [(ARANGE[::-1].copy(), "int32"), (ARANGE + 1, "int32"), (ARANGE.astype(np.float32), "float32")],
    ids=["permuted", "shifted", "float"],
)
def test_other_comparisons_stay_a_matmul(classes, x_dtype):
    before = _module(classes, x_dtype)
    tvm.ir.assert_structural_equal(OneHotMatMul()(before), before)


def test_a_weight_of_unknown_rows_stays_a_matmul():
    before = _module(ARANGE, w_rows="n")
    tvm.ir.assert_structural_equal(OneHotMatMul()(before), before)
