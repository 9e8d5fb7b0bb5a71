"""BoundedGather: a gather by run-time indices clamps them into range instead of reading out of bounds.

Match: ``take(x, indices, axis, mode="fast")`` whose indices are not a constant: what TVM's ONNX
importer writes for every ``Gather`` (after adding the axis length to negative indices, as ONNX
defines them). Rewrite: the same take with ``mode="clip"``.

Why: ``fast`` reads ``x`` at whatever the index says, so an index outside the axis (a token id past
a decoder's vocabulary, a corrupt input) reads outside the tensor and may kill the process with a
segfault; TVM warns of this once per gather at compile time. ``clip`` costs a min and a max per index
and gives every valid index the same element, so models on valid inputs compute the same values
bit for bit; an invalid index reads the nearest row rather than crashing. Constant indices are
checked by the importer and stay as they are. Run it right after import.
"""

from __future__ import annotations

import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["BoundedGather"]

_TAKE = tvm.ir.Op.get("relax.take")


@tvm.transform.module_pass(opt_level=0, name="BoundedGather")
class BoundedGather:
    """``take(..., mode="fast")`` by run-time indices -> ``mode="clip"``; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, lambda func: _Rewriter().visit_expr(func))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_TAKE) or str(call.attrs.mode) != "fast":
            return call
        x, indices = call.args
        if isinstance(indices, tvm.ir.expr.Constant):
            return call
        axis = call.attrs.axis
        return relax.op.take(x, indices, None if axis is None else int(axis), mode="clip")
