"""AArch64 Linux cross build: objects for a 64-bit Arm board, packaged as a deployment bundle.

The target is ``llvm`` with ``mtriple=aarch64-linux-gnu`` and ``+neon,+dotprod`` (Armv8.2 dot
product, present on every Snapdragon since the 845). The library is written as a ``.tar`` of
object files, which needs no cross linker: link it on the device (or with ``aarch64-linux-gnu-g++``)
into a shared library and load it with the Relax VM. It does not run on the build machine. Its
LPBQ layers take the generic kernels, its convs stay channels-first, and the schedule rules tile
for NEON's 32 registers of 4 floats.
"""

from __future__ import annotations

import tvm

from lpbq_tvm.kernels.schedule_rules import RegisterFile
from lpbq_tvm.targets.base import Target

__all__ = ["AArch64"]

MATTR = ("+neon", "+dotprod")
NEON = RegisterFile(lanes=4, registers=32, spare=8)


class AArch64(Target):
    name = "aarch64"
    library_name = "model.tar"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(MATTR)})

    def register_file(self, tvm_target: tvm.target.Target) -> RegisterFile:
        return NEON
