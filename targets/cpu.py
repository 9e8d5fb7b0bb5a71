"""Host CPU target: LLVM for the CPU this process runs on, executed in-process on ``tvm.cpu()``.

The target carries the detected ``mcpu`` (e.g. ``znver4``) so LLVM may use every vector extension
of the host, and ``num-cores`` for TVM's thread pool. TVM runs one thread unless the
``TVM_NUM_THREADS`` environment variable says otherwise. Every lowering mode runs here; the
artifact is a shared library (``export_library`` links it with the host compiler).
"""

from __future__ import annotations

import os

import tvm

NAME = "cpu"
MODES = ("weight-only", "w4a8", "w4a16")
CHANNELS_LAST = True  # NHWC convs: the x86 kernels' layout (passes/channels_last.py)
REQUANTIZE_OUTPUTS = False
LIBRARY_NAME = "model.so"


def tvm_target() -> tvm.target.Target:
    """``llvm`` for the host CPU (a dict-form target: TVM 0.27 rejects ``-mcpu=`` strings)."""
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


def device() -> tvm.runtime.Device | None:
    """Where artifacts of this target run in this process (None: they do not run here)."""
    return tvm.cpu()
