"""WidenFloat16Math: float16 erf / tanh / softmax / sums are computed in float32 and rounded once, so the
compiled float16 result is within half an ulp (plus a float32 error far below it) of the exact one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.widen_float16_math import WidenFloat16Math


def test_float16_calls_are_widened_and_others_kept():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float16"), y: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                a = R.nn.softmax(x, axis=0)
                b = R.sum(x, axis=[1], keepdims=True)
                c = R.exp(x)
                d = R.tanh(y)
                R.output(a, b, c, d)
            return (a, b, c, d)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float16"), y: R.Tensor((4, 8), "float32")):
            with R.dataflow():
                a = R.astype(R.nn.softmax(R.astype(x, "float32"), axis=0), "float16")
                b = R.astype(R.sum(R.astype(x, "float32"), axis=[1], keepdims=True), "float16")
                c = R.exp(x)
                d = R.tanh(y)
                R.output(a, b, c, d)
            return (a, b, c, d)

    actual = relax.transform.Normalize()(WidenFloat16Math()(Before))
    tvm.ir.assert_structural_equal(actual, relax.transform.Normalize()(Expected))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# op -> (Relax builder, float64 reference)
CASES = {
    "erf": (relax.op.erf, np.vectorize(math.erf)),
    "tanh": (relax.op.tanh, np.tanh),
    "sigmoid": (relax.op.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "softmax": (lambda x: relax.op.nn.softmax(x, -1), _softmax),
    "log_softmax": (lambda x: relax.op.nn.log_softmax(x, -1), lambda x: np.log(_softmax(x))),
    "sum": (lambda x: relax.op.sum(x, axis=[-1]), lambda x: x.sum(-1)),
    "mean": (lambda x: relax.op.mean(x, axis=[-1]), lambda x: x.mean(-1)),
    "variance": (lambda x: relax.op.variance(x, axis=[-1]), lambda x: x.var(-1)),
}


@pytest.mark.parametrize("op", list(CASES))
def test_compiled_float16_results_are_correctly_rounded_up_to_float32_error(op):
    """Through the whole CPU pipeline: half a float16 ulp for the final rounding, and 1/8 ulp for the
    float32 computation (its error, a few float32 ulp over 768 terms, is 2^-13 of a float16 ulp each)."""
    make, reference = CASES[op]
    x = np.random.default_rng(0).standard_normal((4, 768)).astype(np.float16)
    builder = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(x.shape, "float16"))
    with builder.function("main", [var]):
        builder.emit_func_output(builder.emit(make(var)))
    actual = build(builder.get()).run({"x": x})["output0"].astype(np.float64)
    exact = reference(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert (np.abs(actual - exact) <= (0.5 + 0.125) * ulp).all()
