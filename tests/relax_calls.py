"""The operator calls of a Relax module's ``main``, for tests of the passes that rewrite them."""

from __future__ import annotations

import tvm
from tvm import relax


def relax_calls(mod: tvm.IRModule, name: str | None = None) -> list[relax.Call]:
    """The calls in ``mod["main"]`` (of the operator ``name`` only, e.g. ``"relax.add"``), in post order."""
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append(e) if isinstance(e, relax.Call) and name in (None, getattr(e.op, "name", None)) else None
        ),
    )
    return found
