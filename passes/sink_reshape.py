"""SinkReshape: elementwise ops after a reshape that keeps the last axis run before it, on the unreshaped tensor.

Match: ``op(reshape(x, S), c)`` (or a unary ``op(reshape(x, S))``, or both operands reshapes to the
same ``S`` of tensors of one shape) where ``op`` is elementwise, ``x`` has the same last axis as
``S`` and every other operand ``c`` varies along the last axis at most (a scalar, or a shape of ones
but its last dim, of rank up to ``len(S)``). Rewrite: ``reshape(op(x, c'), S)`` with ``c'`` the
same values along the last axis, repeatedly, so a chain of such ops (a decomposed batch norm and
its activation) runs on ``x``'s shape and the reshape moves below it.

Why: a layer lowered to a dense kernel over ``[pixels, channels]`` (an LPBQ conv as a matmul over
its im2col columns) is reshaped back to the conv's NHWC output before its batch norm and activation;
``FuseOps`` does not fuse an injective reshape into a kernel's output, so the epilogue ran as a pass
of its own. After this pass the epilogue follows the kernel directly and fuses into it, and the
reshape of a contiguous tensor is free (``RewriteDataflowReshape``). The values are the same: each
element meets the same operands in the same order.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["SinkReshape"]

_RESHAPE = tvm.ir.Op.get("relax.reshape")
_ELEMENTWISE = frozenset(
    tvm.ir.Op.get(f"relax.{name}")
    for name in [
        "add",
        "subtract",
        "multiply",
        "divide",
        "maximum",
        "minimum",
        "power",
        "clip",
        "negative",
        "abs",
        "exp",
        "sqrt",
        "rsqrt",
        "tanh",
        "sigmoid",
        "erf",
        "nn.relu",
        "nn.gelu",
        "nn.gelu_tanh",
        "nn.silu",
    ]
)


@tvm.transform.module_pass(opt_level=0, name="SinkReshape")
class SinkReshape:
    """``op(reshape(x, S), c)`` -> ``reshape(op(x, c'), S)`` for elementwise ``op``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewritten = map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))
        return mod if rewritten.same_as(mod) else relax.transform.DeadCodeElimination()(rewritten)


def _static_shape(expr: relax.Expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape]
    except TypeError:  # symbolic dims
        return None


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def _unreshaped(self, expr: relax.Expr) -> tuple[relax.Expr, list[int]] | None:
        """``(x, S)`` when ``expr`` is a variable bound to ``reshape(x, S)`` that keeps ``x``'s last axis."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        if not isinstance(bound, relax.Call) or not bound.op.same_as(_RESHAPE):
            return None
        source, target = _static_shape(bound.args[0]), _static_shape(expr)
        if not source or not target or source[-1] != target[-1]:
            return None
        return bound.args[0], target

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op not in _ELEMENTWISE:
            return call
        tensors = [i for i, arg in enumerate(call.args) if isinstance(arg.ty, relax.TensorType)]
        reshaped = {i: found for i in tensors if (found := self._unreshaped(call.args[i])) is not None}
        if not reshaped:
            return call
        sources = {tuple(_static_shape(x)) for x, _ in reshaped.values()}
        targets = {tuple(target) for _, target in reshaped.values()}
        if len(sources) != 1 or len(targets) != 1:
            return call
        (target,) = targets
        args = list(call.args)
        for i in tensors:
            if i in reshaped:
                args[i] = reshaped[i][0]
                continue
            along_last = _along_last_axis(args[i], target)
            if along_last is None:
                return call
            args[i] = along_last
        flat = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        return relax.op.reshape(flat, list(target))


def _along_last_axis(operand: relax.Expr, target: tuple[int, ...]) -> relax.Expr | None:
    """``operand`` as a tensor of its last axis (or itself, a scalar) when it varies along the last
    axis of ``target`` only; None otherwise."""
    shape = _static_shape(operand)
    if shape is None or len(shape) > len(target):
        return None
    if not shape:
        return operand
    if math.prod(shape[:-1]) != 1 or shape[-1] not in (1, target[-1]):
        return None
    if len(shape) == 1:
        return operand
    if isinstance(operand, tvm.ir.expr.Constant):
        return relax.const(operand.value.numpy().reshape(shape[-1]))
    return relax.op.reshape(operand, [shape[-1]])
