"""Host CPU target: LLVM for the CPU this process runs on, executed in-process on ``tvm.cpu()``.

The target carries the detected ``mcpu`` (e.g. ``znver4``) so LLVM may use every vector extension
of the host, and ``num-cores`` for TVM's thread pool. TVM runs one thread unless the
``TVM_NUM_THREADS`` environment variable says otherwise. Every mode runs here; 2-D convs run
channels-last (the x86 kernels' layout); the artifact is a shared library (``export_library``
links it with the host compiler). On an x86-64 host its LPBQ layers take the x86 kernels.
"""

from __future__ import annotations

import os

import tvm

from lpbq_tvm.kernels import x86
from lpbq_tvm.kernels.schedule_rules import RegisterFile
from lpbq_tvm.kernels.x86.isa import register_file
from lpbq_tvm.targets.base import Target

__all__ = ["CPU"]


class CPU(Target):
    name = "cpu"
    channels_last = True
    kernel_families = (x86,)

    def tvm_target(self) -> tvm.target.Target:
        """``llvm`` for the host CPU (a dict-form target: TVM 0.27 rejects ``-mcpu=`` strings)."""
        return tvm.target.Target(
            {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
        )

    def register_file(self, tvm_target: tvm.target.Target) -> RegisterFile:
        return register_file(tvm_target)

    def device(self) -> tvm.runtime.Device | None:
        return tvm.cpu()
