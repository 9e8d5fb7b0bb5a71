"""Walks over Relax and TIR the tests share: the calls, constants and kernels of a module, the blocks of a kernel."""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx

__all__ = ["block_names", "called", "constants", "kernels_called", "prim_funcs", "relax_calls"]


def _main(mod: tvm.IRModule | relax.Function) -> relax.Function:
    return mod["main"] if isinstance(mod, tvm.IRModule) else mod


def relax_calls(mod: tvm.IRModule | relax.Function, name: str | None = None) -> list[relax.Call]:
    """The calls in ``mod["main"]`` (or a function), of the operator ``name`` only (e.g. ``"relax.add"``),
    in post order."""
    found = []
    relax.analysis.post_order_visit(
        _main(mod),
        lambda e: (
            found.append(e) if isinstance(e, relax.Call) and name in (None, getattr(e.op, "name", None)) else None
        ),
    )
    return found


def called(mod: tvm.IRModule | relax.Function) -> list[str]:
    """What ``mod["main"]`` calls, in post order: operator names, and the kernel of each ``call_tir``."""
    return [
        call.args[0].name_hint if call.op.name == "relax.call_tir" else call.op.name
        for call in relax_calls(mod)
        if isinstance(call.op, tvm.ir.Op)
    ]


def kernels_called(mod: tvm.IRModule | relax.Function) -> list[str]:
    """The kernels ``mod["main"]`` calls through ``call_tir``, in post order."""
    return [call.args[0].name_hint for call in relax_calls(mod, "relax.call_tir")]


def constants(expr: relax.Expr) -> list[relax.Constant]:
    """The Relax constants in ``expr``, in post order."""
    found = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, tvm.ir.GenericConst) else None)
    return found


def prim_funcs(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The TIR functions of ``mod``, by name."""
    return {gv.name_hint: func for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}


def block_names(func: tirx.PrimFunc) -> list[str]:
    """The names of a kernel's blocks in program order, the root block first."""
    return re.findall(r'T\.sblock\("(\w+)"\)', func.script())
