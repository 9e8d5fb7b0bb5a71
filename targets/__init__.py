"""Compilation targets of lpbq_tvm, installed as ``lpbq_tvm.targets``: one module per target.

Each target module has ``NAME``, ``tvm_target()`` (the ``tvm.target.Target`` to compile for) and
``device()`` (where its artifacts run in this process).
"""

from __future__ import annotations

from types import ModuleType

from lpbq_tvm.targets import cpu

__all__ = ["TARGETS", "get_target"]

TARGETS: dict[str, ModuleType] = {module.NAME: module for module in (cpu,)}


def get_target(name: str) -> ModuleType:
    """The target module called ``name``; ``ValueError`` lists the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        msg = f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}"
        raise ValueError(msg) from None
