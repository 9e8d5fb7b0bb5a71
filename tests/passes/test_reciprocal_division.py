"""ReciprocalDivision: divisions by float32 constants with finite reciprocals become multiplications,
within the error bound the module states; other divisions stay."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.reciprocal_division import ReciprocalDivision

DIVISOR = np.array([3.0, 6.0, 0.1, -7.3], np.float32)
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


def _module(divisor: np.ndarray) -> tvm.IRModule:
    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((64, 4), "float32"), y: R.Tensor((64, 4), "float32")):
            with R.dataflow():
                by_tensor = R.divide(x, R.const(divisor))
                by_scalar = R.divide(x, R.const(6.0, "float32"))
                by_variable = R.divide(x, y)
                out = R.add(R.add(by_tensor, by_scalar), by_variable)
                R.output(out)
            return out

    return Module


def test_a_division_by_a_constant_becomes_a_multiplication_by_its_float32_reciprocal():
    reciprocal, sixth = np.float32(1) / DIVISOR, np.float32(1) / np.float32(6)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((64, 4), "float32"), y: R.Tensor((64, 4), "float32")):
            with R.dataflow():
                by_tensor = R.multiply(x, R.const(reciprocal))
                by_scalar = R.multiply(x, R.const(sixth, "float32"))
                by_variable = R.divide(x, y)
                out = R.add(R.add(by_tensor, by_scalar), by_variable)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(ReciprocalDivision()(_module(DIVISOR)), Expected)


@pytest.mark.parametrize("divisor", [[2.0, 0.0, 1.0, 1.0], [1e-39, 1, 1, 1]], ids=["zero", "subnormal"])
def test_a_divisor_without_a_finite_reciprocal_stays_a_division(divisor):
    """No finite float32 reciprocal (0, or below 2^-128): that division is left as it is."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((64, 4), "float32"), y: R.Tensor((64, 4), "float32")):
            with R.dataflow():
                by_tensor = R.divide(x, R.const(np.array(divisor, np.float32)))
                out = R.divide(by_tensor, y)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(ReciprocalDivision()(Before), Before)


def test_compiled_quotients_are_within_the_stated_bound_of_the_exact_ones():
    """``x · RN(1/c)`` = ``(x/c)(1 + e1)(1 + e2)``, ``|e| <= 2^-24``: within 3 · 2^-24 of x / c, relative."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 4)) * 10.0 ** rng.integers(-3, 4, (64, 4))).astype(np.float32)
    y = rng.uniform(1, 2, (64, 4)).astype(np.float32)
    out = build(ReciprocalDivision()(_module(DIVISOR)), pipeline=PLAIN).run({"x": x, "y": y})["output0"]
    wide = x.astype(np.float64)
    exact = wide / DIVISOR + wide / 6.0 + wide / y
    # each quotient within 3 · 2^-24 relative; the two float32 additions round by 2^-24 of their sums
    magnitude = np.abs(wide / DIVISOR) + np.abs(wide / 6.0) + np.abs(wide / y)
    bound = 3 * 2.0**-24 * magnitude + 2 * 2.0**-24 * magnitude
    assert np.all(np.abs(out.astype(np.float64) - exact) <= bound * (1 + 2.0**-20))  # (+ second-order terms)
