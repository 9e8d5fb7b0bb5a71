"""NarrowFusedEpilogues: ops fused after a scheduled kernel get the kernel's int32 indices.

Runs between ``FuseOps`` and ``FuseTIR``. A scheduled kernel (a PrimFunc with ``tirx.is_scheduled``,
built from TE with int32 shapes, like the x86 LPBQ kernels) that ``FuseOps`` grouped with the
elementwise ops after it (its batch norm and activation, legalized with int64 shapes) cannot be
merged as is: ``FuseTIR`` maps the kernel's output buffer and the next op's input buffer to the same
Relax variable and requires them to be the same type. Each such op is replaced, in that group
only, by a copy with its indices narrowed to int32 (``ForceNarrowIndexToInt32``; the shapes are
static and small); the same op elsewhere keeps its int64 original.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

__all__ = ["NarrowFusedEpilogues"]

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@tvm.transform.module_pass(opt_level=0, name="NarrowFusedEpilogues")
class NarrowFusedEpilogues:
    """Int32 copies of the ops grouped with a scheduled kernel; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        groups = [
            (gvar, func)
            for gvar, func in mod.functions_items()
            if isinstance(func, relax.Function) and func.attrs is not None and "Primitive" in func.attrs
        ]
        builder = relax.BlockBuilder(mod)
        narrowed: dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar] = {}
        rewritten = {}
        for gvar, func in groups:
            callees = [call.args[0] for call in _tir_calls(func)]
            if not any(_scheduled(mod[callee]) for callee in callees):
                continue
            for callee in callees:
                if not _scheduled(mod[callee]) and callee not in narrowed:
                    int32 = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": mod[callee]}))["main"]
                    narrowed[callee] = builder.add_func(int32, f"{callee.name_hint}_int32")
            rewritten[gvar] = func
        if not rewritten:
            return mod
        mod = builder.get()
        for gvar, func in rewritten.items():
            mod.update_func(gvar, _Retarget(narrowed).visit_expr(func))
        return mod


def _scheduled(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and "tirx.is_scheduled" in func.attrs


def _tir_calls(func: relax.Function) -> list[relax.Call]:
    calls = []
    relax.analysis.post_order_visit(
        func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) and e.op.same_as(_CALL_TIR) else None
    )
    return calls


@relax.expr_functor.mutator
class _Retarget(relax.PyExprMutator):
    def __init__(self, narrowed: dict) -> None:
        super().__init__()
        self.narrowed = narrowed

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(_CALL_TIR) and call.args[0] in self.narrowed:
            return relax.Call(call.op, [self.narrowed[call.args[0]], *call.args[1:]], call.attrs, call.ty_args)
        return call
