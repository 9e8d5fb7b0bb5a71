"""Compilation targets of lpbq_tvm, installed as ``lpbq_tvm.targets``: one module per target.

Each target module has ``NAME``, ``MODES`` (the lowering modes it builds), ``REQUANTIZE_OUTPUTS``
(HTP style: compile the QNN export's Q/DQ graph, LPBQ layers requantizing their outputs),
``CHANNELS_LAST`` (whether 2-D convs run in NHWC, :mod:`lpbq_tvm.passes.channels_last`),
``LIBRARY_NAME`` (the library file of a bundle), ``tvm_target()`` (the ``tvm.target.Target`` to
compile for) and ``device()`` (where its artifacts run in this process, or None).
"""

from __future__ import annotations

from types import ModuleType

from lpbq_tvm.targets import aarch64, cpu, htp_sim

__all__ = ["TARGETS", "get_target"]

TARGETS: dict[str, ModuleType] = {module.NAME: module for module in (cpu, aarch64, htp_sim)}


def get_target(name: str) -> ModuleType:
    """The target module called ``name``; ``ValueError`` lists the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        msg = f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}"
        raise ValueError(msg) from None
