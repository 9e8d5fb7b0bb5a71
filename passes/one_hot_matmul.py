"""OneHotMatMul: a matmul of a one-hot encoding becomes a row lookup.

Match: ``matmul(astype(equal(x, arange(n)), float), w)`` with ``x`` an integer tensor whose last
axis has length 1, ``arange(n)`` a constant ``0, 1, ..., n - 1`` along its last axis (no more axes
than ``x``, the others of length 1) and ``w`` a 2-D ``[n, F]`` weight
(a constant or a parameter): how TensorFlow and JAX exports write an embedding lookup (magika's
byte embedding, 2048 x 257 one-hot rows times a 257 x 64 weight). Rewrite: ``take(w, x)`` along
rows, with rows of zeros where ``x`` is outside ``0..n-1`` (where the one-hot row is all zeros).

Exact: each product of the matmul is ``1 · w`` or ``0 · w`` and the sum of ``w`` with zeros is ``w``,
for every finite ``w`` (only the sign of a zero may differ). It does ``F`` loads per row instead of
``n · F`` multiply-adds, and the one-hot tensor is never made. Run it before legalization.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["OneHotMatMul"]

_MATMUL, _ASTYPE, _EQUAL = (tvm.ir.Op.get(f"relax.{name}") for name in ("matmul", "astype", "equal"))


@tvm.transform.module_pass(opt_level=0, name="OneHotMatMul")
class OneHotMatMul:
    """``matmul(one_hot(x), w)`` -> ``take(w, x)``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, _rewrite)


def _rewrite(func: relax.Function) -> relax.Function:
    """``func`` with its one-hot matmuls replaced, and the one-hot tensors they leave unused removed."""
    rewriter = _Rewriter()
    rewritten = rewriter.visit_expr(func)
    return relax.analysis.remove_all_unused(rewritten) if rewriter.replaced else rewritten


def _dim(expr: relax.Expr, axis: int) -> int | None:
    """The length of ``expr``'s tensor axis ``axis`` when it is a known integer, else None."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], tvm.tirx.IntImm):
        return None
    return int(shape[axis])


def _arange_length(expr: relax.Expr, ndim: int) -> int | None:
    """``n`` if ``expr`` is the integer constant ``[0, 1, ..., n - 1]`` along its last axis (any
    others of length 1, at most ``ndim`` axes), else None."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    if value.ndim > ndim or value.dtype.kind not in "iu" or value.size != value.shape[-1]:
        return None
    return value.size if np.array_equal(value.reshape(-1), np.arange(value.size)) else None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    replaced = False

    def _bound(self, expr: relax.Expr, op: tvm.ir.Op) -> relax.Call | None:
        """The call of ``op`` that ``expr`` is, or is bound to."""
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        return expr if isinstance(expr, relax.Call) and expr.op.same_as(op) else None

    def _one_hot_indices(self, expr: relax.Expr) -> tuple[relax.Expr, int] | None:
        """``(x, n)`` when ``expr`` is ``astype(equal(x, arange(n)), float)`` with x's last axis of length 1."""
        cast = self._bound(expr, _ASTYPE)
        if cast is None or not str(cast.ty.dtype).startswith("float"):
            return None
        equal = self._bound(cast.args[0], _EQUAL)
        if equal is None:
            return None
        for x, classes in (equal.args, equal.args[::-1]):
            if _dim(x, -1) != 1 or not str(x.ty.dtype).startswith(("int", "uint")):
                continue
            n = _arange_length(classes, x.ty.ndim)
            if n is not None:
                return x, n
        return None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_MATMUL):
            return call
        found = self._one_hot_indices(call.args[0])
        weight = call.args[1]
        if found is None or weight.ty.ndim != 2 or _dim(weight, 0) != found[1]:
            return call
        x, n = found
        self.replaced = True
        indices = relax.op.squeeze(x, [-1])
        rows = relax.op.take(weight, indices, axis=0, mode="clip")
        inside = relax.op.logical_and(
            relax.op.greater_equal(indices, relax.const(0, x.ty.dtype)),
            relax.op.less(indices, relax.const(n, x.ty.dtype)),
        )
        looked_up = relax.op.where(relax.op.expand_dims(inside, [-1]), rows, relax.const(0, str(weight.ty.dtype)))
        return looked_up if weight.ty.dtype == call.ty.dtype else relax.op.astype(looked_up, call.ty.dtype)
