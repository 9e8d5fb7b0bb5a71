"""WidenFloat16Math: float16 functions and sums that lose precision in float16 are computed in float32.

Match: a call of one of :data:`WIDENED_OPS` (``erf``, ``tanh``, ``sigmoid``, the activations built
on them, ``softmax`` / ``log_softmax``, ``sum`` / ``mean`` / ``variance``) on a float16 tensor.
Rewrite: ``astype(op(astype(x, "float32")), "float16")``. Run it before ``FastMathTransform`` and
legalization, so the float32 ops take the fast polynomial forms.

Why: TVM computes these in float16 arithmetic, and ``FastMathTransform`` gives ``erf`` a polynomial
fit for float32. Against float64, float16 inputs (docs/internals/cpu-pipeline.md has the figures)
came out up to 12 ulp off for ``erf``, 7 for ``tanh``, 15 for a 768-wide ``softmax`` and 16 for a
768-term ``sum``. In float32 each is within a few float32 ulp, 2^-13 of a float16 ulp each, so the
float16 result is within half an ulp plus that: what a float16 model means, whatever the hardware.
``exp``, ``log`` and ``sqrt`` (LLVM's half-precision intrinsics) and ``layer_norm`` (accumulates
in float32 already) measured within half an ulp, so they are left alone; so are ``matmul`` and
convolutions (their float16 accumulation is what TVM's kernels do; widening them is a kernel choice).
"""

from __future__ import annotations

import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["WIDENED_OPS", "WidenFloat16Math"]

WIDENED_OPS = (
    "relax.erf",
    "relax.tanh",
    "relax.sigmoid",
    "relax.nn.gelu",
    "relax.nn.gelu_tanh",
    "relax.nn.silu",
    "relax.nn.softmax",
    "relax.nn.log_softmax",
    "relax.sum",
    "relax.mean",
    "relax.variance",
)


@tvm.transform.module_pass(opt_level=0, name="WidenFloat16Math")
class WidenFloat16Math:
    """float16 ``op(x)`` -> ``astype(op(astype(x, float32)), float16)``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in WIDENED_OPS:
            return call
        if str(call.args[0].ty.dtype) != "float16":
            return call
        widened = relax.Call(call.op, [relax.op.astype(call.args[0], "float32")], call.attrs, call.ty_args)
        return relax.op.astype(widened, "float16")
