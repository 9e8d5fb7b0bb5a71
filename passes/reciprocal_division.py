"""ReciprocalDivision: a float32 division by a constant becomes a multiplication by its reciprocal.

Match: ``divide(x, c)`` with ``c`` a float32 constant (a scalar or a tensor, after ``FoldConstant``:
a decomposed batch norm's ``sqrt(var + eps)``, HardSwish's 6). Rewrite: ``multiply(x, 1 / c)``, the
reciprocal computed once in float32. A vector division has many times a multiplication's
throughput cost, and models divide every element of an activation this way (docs/performance.md
measures what it saves). Run it after ``FoldConstant``, before legalization.

Error: ``x · RN(1/c)`` is ``(x / c)(1 + e1)(1 + e2)`` with ``|e1|, |e2| <= 2^-24``, so it differs
from the correctly rounded ``x / c`` by at most ``3 · 2^-24`` relative (under 2 ulp), the kind of
contract ``FastMathTransform`` makes for ``exp`` and ``tanh`` in the same pipeline. A divisor whose
reciprocal is not a finite float32 (0, or below 2^-128) stays a division. Integer arithmetic is
not Relax arithmetic on this path: the LPBQ kernels quantize activations in TIR (``x / sx``, a true
division, docs/design.md §3) and ``quantize`` ops are legalized after this pass, so neither is touched.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["ReciprocalDivision"]

_DIVIDE = tvm.ir.Op.get("relax.divide")


@tvm.transform.module_pass(opt_level=0, name="ReciprocalDivision")
class ReciprocalDivision:
    """``divide(x, float32 constant)`` -> ``multiply(x, reciprocal)``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))


def _reciprocal(divisor: relax.Expr) -> np.ndarray | None:
    """``1 / divisor`` in float32 when the divisor is a float32 constant with a finite reciprocal."""
    if not isinstance(divisor, tvm.ir.expr.Constant) or str(divisor.value.dtype) != "float32":
        return None
    with np.errstate(divide="ignore", over="ignore"):
        reciprocal = np.asarray(np.float32(1) / divisor.value.numpy(), dtype=np.float32)
    return reciprocal if np.all(np.isfinite(reciprocal)) else None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_DIVIDE):
            reciprocal = _reciprocal(call.args[1])
            if reciprocal is not None:
                return relax.op.multiply(call.args[0], relax.const(reciprocal))
        return call
