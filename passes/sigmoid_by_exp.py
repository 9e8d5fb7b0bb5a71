"""SigmoidByExp: a float32 ``sigmoid(x)`` becomes ``1 / (1 + exp(-x))``, so that the exp takes the fast form.

Match: ``sigmoid(x)`` on float32 (SiLU / Swish in decoder MLPs and mobile CNNs; float16 ones are
float32 by then, ``WidenFloat16Math``). Rewrite: ``divide(1, add(1, exp(negative(x))))``, the
formula TVM itself lowers ``sigmoid`` to, written in Relax so that ``FastMathTransform`` (which runs
after this pass) turns its ``exp`` into TVM's vectorisable polynomial. Left to TVM, the ``exp``
inside the sigmoid is a libm call per element, scalar even in a vectorised loop: the SwiGLU
epilogue of a decoder's MLP spent more time in it than in its whole matmul tile
(docs/performance.md).

Error: the fast ``exp`` is within 2 ulp (2^-22) relative (the pipeline's contract, checked by the
tests); ``e/(1 + e) <= 1`` carries that into the denominator at most once, and the add and the
division round once each, so the sigmoid is within ``2^-22 + 2 · 2^-24`` (1.5 · 2^-22) relative.
Large negative x: ``exp(-x)`` saturates (the fast form clamps its input), and the quotient goes to
0 as the sigmoid does; large positive x gives exactly 1.
"""

from __future__ import annotations

import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["SigmoidByExp"]

_SIGMOID = tvm.ir.Op.get("relax.sigmoid")


@tvm.transform.module_pass(opt_level=0, name="SigmoidByExp")
class SigmoidByExp:
    """float32 ``sigmoid(x)`` -> ``1 / (1 + exp(-x))``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_SIGMOID) and str(call.args[0].ty.dtype) == "float32":
            one = relax.const(1.0, "float32")
            return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(call.args[0]))))
        return call
