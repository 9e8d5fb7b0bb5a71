"""SigmoidByExp: a float32 sigmoid becomes ``1 / (1 + exp(-x))``; other dtypes keep their sigmoid. Compiled
(with the fast exp of the CPU pipeline), it holds the bound the module states, and its extremes."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.sigmoid_by_exp import SigmoidByExp


def test_a_float32_sigmoid_becomes_the_reciprocal_of_one_plus_exp():
    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((64, 8), "float32"), h: R.Tensor((64, 8), "float16")):
            with R.dataflow():
                silu = R.multiply(x, R.sigmoid(x))
                half = R.sigmoid(h)
                R.output(silu, half)
            return silu, half

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((64, 8), "float32"), h: R.Tensor((64, 8), "float16")):
            with R.dataflow():
                negative = R.negative(x)
                exp = R.exp(negative)
                denominator = R.add(R.const(1.0, "float32"), exp)
                sigmoid = R.divide(R.const(1.0, "float32"), denominator)
                silu = R.multiply(x, sigmoid)
                half = R.sigmoid(h)
                R.output(silu, half)
            return silu, half

    tvm.ir.assert_structural_equal(SigmoidByExp()(Module), Expected)


def test_the_compiled_sigmoid_holds_its_bound_and_its_extremes():
    """Within 2^-22 + 2 · 2^-24 of the float64 sigmoid relatively while that is a normal float32; below
    x = -87, where the fast exp clamps its input, within the smallest normal float32 (2^-126) of it
    and never negative; exactly 1 at +inf and 0.5 at 0; no NaN."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((64, 8), "float32")):
            with R.dataflow():
                y = R.sigmoid(x)
                R.output(y)
            return y

    x = np.concatenate([np.linspace(-120, 120, 509), [-np.inf, np.inf, 0.0]]).astype(np.float32).reshape(64, 8)
    y = build(Module).run({"x": x})["output0"].astype(np.float64)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    normal = exact >= 2.0**-126
    assert not np.isnan(y).any() and (y >= 0).all()
    assert (np.abs(y - exact)[normal] / exact[normal]).max() <= 2.0**-22 + 2 * 2.0**-24
    assert np.abs(y - exact)[~normal].max() <= 2.0**-126
    assert (y[x == np.inf] == 1).all() and (y[x == 0] == 0.5).all()
