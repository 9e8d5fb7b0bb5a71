"""FoldConstantsInNumpy: ops that select or move the values of constants are folded in numpy.

Match: a call of ``isnan`` / ``isinf`` / ``isfinite``, ``where``, ``reshape`` / ``expand_dims`` /
``squeeze``, ``permute_dims`` or ``broadcast_to`` of a static output shape whose tensor arguments are
all constants (inline, or variables bound to constants earlier in the function, including ones this
pass folded). Rewrite: the constant numpy computes.

Why: TVM's ``FoldConstant`` evaluates each such call by legalizing it, compiling the PrimFunc with
LLVM and running it, one compile per call. The ONNX importer guards each bound of a ``Clip`` with
``where(isnan(bound), ±inf, bound)`` and reshapes each conv's bias, so a model with many clips spent
most of its float32 compile folding them (docs/performance.md, *Compile times*). None of these ops
computes a new value (a test, a selection, a copy in another order), so numpy's result is TVM's
bit for bit. Run it before ``FoldConstant``, which folds the rest as before.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["FoldConstantsInNumpy"]


def _to_output_shape(call: relax.Call, value: np.ndarray) -> np.ndarray:
    return value.reshape(_static_shape(call))


def _permute(call: relax.Call, value: np.ndarray) -> np.ndarray:
    axes = call.attrs.axes
    return np.transpose(value, None if axes is None else [int(a) for a in axes])


_FOLDS = {
    "relax.isnan": lambda _call, x: np.isnan(x),
    "relax.isinf": lambda _call, x: np.isinf(x),
    "relax.isfinite": lambda _call, x: np.isfinite(x),
    "relax.where": lambda _call, condition, x, y: np.where(condition, x, y),
    "relax.reshape": _to_output_shape,
    "relax.expand_dims": _to_output_shape,
    "relax.squeeze": _to_output_shape,
    "relax.permute_dims": _permute,
    "relax.broadcast_to": lambda call, x: np.broadcast_to(x, _static_shape(call)),
}


@tvm.transform.module_pass(opt_level=0, name="FoldConstantsInNumpy")
class FoldConstantsInNumpy:
    """Folds the value-preserving ops of the module docstring on constants in numpy."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Folder().visit_expr(func))


def _static_shape(call: relax.Call) -> tuple[int, ...] | None:
    """The call's output shape when every dimension is a known integer."""
    ty = call.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = ty.shape.values
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        fold = _FOLDS.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        if fold is None or _static_shape(call) is None:
            return call
        values = []
        for arg in call.args:
            if isinstance(arg.ty, relax.ShapeType):  # a target shape: the output's, static
                continue
            constant = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
            if not isinstance(constant, tvm.ir.expr.Constant):
                return call
            values.append(constant.value.numpy())
        folded = np.array(fold(call, *values), order="C")  # (ascontiguousarray makes a scalar 1-d)
        assert (folded.shape, str(folded.dtype)) == (_static_shape(call), call.ty.dtype), call.op.name
        return relax.const(folded)
