"""AArch64 Linux cross build: objects for a 64-bit Arm board, packaged as a deployment bundle.

The target is ``llvm`` with ``mtriple=aarch64-linux-gnu`` and, by default, ``+neon,+dotprod``
(Armv8.2 dot product, present on every Snapdragon since the 845). The library is written as a
``.tar`` of object files, which needs no cross linker: link it on the device (or with
``aarch64-linux-gnu-g++``) into a shared library and load it with the Relax VM. It does not run
on the build machine.
"""

from __future__ import annotations

import tvm

NAME = "aarch64"
MODES = ("weight-only", "w4a8", "w4a16")
CHANNELS_LAST = False  # its convs take the generic channels-first kernels
REQUANTIZE_OUTPUTS = False
LIBRARY_NAME = "model.tar"
MATTR = ("+neon", "+dotprod")


def tvm_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(MATTR)})


def device() -> tvm.runtime.Device | None:
    return None
