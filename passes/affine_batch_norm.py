"""AffineBatchNorm: an inference batch norm with constant statistics becomes one scale and one shift.

Match: ``nn.batch_norm(x, gamma, beta, mean, var)`` (not training) whose four parameters are
constants. Rewrite: ``x * a + b`` per channel along its axis, with ``a = gamma / sqrt(var + eps)``
and ``b = beta - mean * a`` computed in float64 and rounded once to the data's dtype; the moving
statistics it also returns stay as they are.

``DecomposeOpsForInference`` would give ``(x - mean) * (1 / sqrt(var + eps)) * gamma + beta``:
four operations on every element, which ``FoldConstant`` cannot merge. Two are left here, and in a
fused epilogue LLVM contracts them into one FMA. The conv before a batch norm cannot absorb the
scale as onnxruntime's fusion does: its weight is a run-time parameter, and an LPBQ weight's
encoding belongs to the weight as calibrated. Run it before ``DecomposeOpsForInference`` (which
would decompose the batch norm first) and legalization.

Error: ``a`` and ``b`` are within half an ulp of the exact values, and ``x * a + b`` rounds once or
twice, so the result is within ``2^-24 (2 |x a| + |b| + |y|)`` of the exact batch norm of ``x``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["AffineBatchNorm"]

_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")


@tvm.transform.module_pass(opt_level=0, name="AffineBatchNorm")
class AffineBatchNorm:
    """``batch_norm`` with constant parameters -> ``x * a + b``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))


def _scale_and_shift(call: relax.Call) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, b)`` of an inference batch norm with constant parameters, in its dtype, shaped to
    broadcast along its axis; None for any other batch norm (or data of unknown rank)."""
    attrs, data = call.attrs, call.args[0].ty
    if attrs.training or data.ndim < 1 or not all(isinstance(arg, tvm.ir.expr.Constant) for arg in call.args[1:]):
        return None
    gamma, beta, mean, var = (arg.value.numpy().astype(np.float64) for arg in call.args[1:])
    scale = (gamma if attrs.scale else 1.0) / np.sqrt(var + float(attrs.epsilon))
    shift = (beta if attrs.center else 0.0) - mean * scale
    shape = (-1,) + (1,) * (data.ndim - 1 - int(attrs.axis) % data.ndim)
    return scale.astype(str(data.dtype)).reshape(shape), shift.astype(str(data.dtype)).reshape(shape)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_BATCH_NORM):
            return call
        folded = _scale_and_shift(call)
        if folded is None:
            return call
        scale, shift = folded
        normalized = relax.op.add(relax.op.multiply(call.args[0], relax.const(scale)), relax.const(shift))
        return relax.Tuple([normalized, call.args[3], call.args[4]])
