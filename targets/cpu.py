"""Host CPU target: LLVM for the CPU this process runs on, executed in-process on ``tvm.cpu()``.

The target carries the detected ``mcpu`` (e.g. ``znver4``) so LLVM may use every vector extension
of the host, and ``num-cores`` for TVM's thread pool. TVM runs one thread unless the
``TVM_NUM_THREADS`` environment variable says otherwise. Kernels use the default lowering of
their tensor expressions (scheduled kernels are a later step).
"""

from __future__ import annotations

import os

import tvm

NAME = "cpu"


def tvm_target() -> tvm.target.Target:
    """``llvm`` for the host CPU (a dict-form target: TVM 0.27 rejects ``-mcpu=`` strings)."""
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


def device() -> tvm.runtime.Device:
    return tvm.cpu()
