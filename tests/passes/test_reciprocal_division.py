"""ReciprocalDivision: divisions by float32 constants with finite reciprocals become multiplications,
within the error bound the module states; other divisions stay."""

from __future__ import annotations

import numpy as np
import tvm
from ir import relax_calls
from tvm import relax
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.reciprocal_division import ReciprocalDivision

DIVISOR = np.array([3.0, 6.0, 0.1, -7.3], np.float32)


def _module(divisor: np.ndarray) -> tvm.IRModule:
    @tvm.script.ir_module
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
    rewritten = ReciprocalDivision()(_module(DIVISOR))
    multiplies = relax_calls(rewritten, "relax.multiply")
    reciprocals = sorted((m.args[1].value.numpy() for m in multiplies), key=np.size)
    np.testing.assert_array_equal(reciprocals[0], np.float32(1) / np.float32(6))
    np.testing.assert_array_equal(reciprocals[1], np.float32(1) / DIVISOR)
    (division,) = relax_calls(rewritten, "relax.divide")  # by the variable y
    assert isinstance(division.args[1], relax.Var)


def test_a_divisor_without_a_finite_reciprocal_stays_a_division():
    for divisor in (np.array([2.0, 0.0, 1.0, 1.0], np.float32), np.array([1e-39, 1, 1, 1], np.float32)):
        rewritten = ReciprocalDivision()(_module(divisor))
        assert len(relax_calls(rewritten, "relax.divide")) == 2 and len(relax_calls(rewritten, "relax.multiply")) == 1


def test_compiled_quotients_are_within_the_stated_bound_of_the_exact_ones():
    """``x · RN(1/c)`` = ``(x/c)(1 + e1)(1 + e2)``, ``|e| <= 2^-24``: within 3 · 2^-24 of x / c, relative."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 4)) * 10.0 ** rng.integers(-3, 4, (64, 4))).astype(np.float32)
    y = rng.uniform(1, 2, (64, 4)).astype(np.float32)
    out = build(_module(DIVISOR)).run({"x": x, "y": y})["output0"].astype(np.float64)
    wide = x.astype(np.float64)
    exact = wide / DIVISOR + wide / 6.0 + wide / y
    # each quotient within 3 · 2^-24 relative; the two float32 additions round by 2^-24 of their sums
    magnitude = np.abs(wide / DIVISOR) + np.abs(wide / 6.0) + np.abs(wide / y)
    bound = 3 * 2.0**-24 * magnitude + 2 * 2.0**-24 * magnitude
    assert np.all(np.abs(out - exact) <= bound * (1 + 2.0**-20))  # (+ second-order terms)
