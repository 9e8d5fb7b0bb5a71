"""Compilation targets of lpbq_tvm, installed as ``lpbq_tvm.targets``: one module per target.

Each module defines a :class:`~lpbq_tvm.targets.base.Target` subclass (:mod:`~lpbq_tvm.targets.base`
says what a target decides); :data:`TARGETS` holds one instance of each, by name, and the CLI's
``--target`` choices are its keys.
"""

from __future__ import annotations

from lpbq_tvm.targets import llvm_math  # noqa: F401  (registers TVM lowering rules)
from lpbq_tvm.targets.aarch64 import AArch64, AArch64I8mm
from lpbq_tvm.targets.base import Target
from lpbq_tvm.targets.cpu import CPU
from lpbq_tvm.targets.htp_sim import HTPSim

__all__ = ["TARGETS", "Target", "get_target"]

TARGETS: dict[str, Target] = {target.name: target for target in (CPU(), AArch64(), AArch64I8mm(), HTPSim())}


def get_target(name: str) -> Target:
    """The target called ``name``; ``ValueError`` lists the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        msg = f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}"
        raise ValueError(msg) from None
