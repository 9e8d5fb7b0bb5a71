"""Every LPBQ kernel keeps its small buffers on the stack, where LLVM holds them in registers.

TVM 0.27's ``LowerTVMBuiltin`` turns an allocation into a ``TVMBackendAllocWorkspace`` call unless its
scope is ``"global"`` and it is under 1 KiB: a ``"local"`` register tile, or a TVMScript binding in a
tensor intrinsic (``x = ...``, an ``alloc_local``), becomes heap memory allocated in every parallel
task that LLVM must keep up to date — the aarch64 lane-pair GEMV stored its 32 sums every block.
"""

from __future__ import annotations

import re

import pytest
import tvm

from lpbq_tvm.kernels.aarch64.dense import integer_dense, weight_only_dense
from lpbq_tvm.kernels.x86.dense import w4a8_dense, w4a16_dense
from lpbq_tvm.kernels.x86.weight_only import weight_only_dense as x86_weight_only_dense

MAX_STACK_ALLOCA = 1024  # TVM's runtime::kMaxStackAlloca: below it, a global-scope buffer is an alloca
DOTPROD, I8MM = (
    tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", *extra]})
    for extra in ((), ("+i8mm",))
)
ICELAKE, HASWELL = (
    tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2}) for cpu in ("icelake-server", "haswell")
)

KERNELS = {
    "aarch64 w4a8 lane pairs": lambda: (integer_dense(1, 128, 256, 64, 8, target=DOTPROD), DOTPROD),
    "aarch64 w4a8 nibbles": lambda: (integer_dense(1, 112, 256, 64, 8, target=DOTPROD), DOTPROD),
    "aarch64 w4a16 lane pairs": lambda: (integer_dense(1, 128, 256, 64, 16, target=DOTPROD), DOTPROD),
    "aarch64 w4a8 fold-k": lambda: (integer_dense(8, 128, 256, 64, 8, target=DOTPROD), DOTPROD),
    "aarch64 w4a8 usmmla": lambda: (integer_dense(8, 128, 256, 64, 8, target=I8MM), I8MM),
    "aarch64 weight-only GEMV": lambda: (weight_only_dense(1, 128, 256, 64, target=DOTPROD), DOTPROD),
    "aarch64 weight-only GEMM": lambda: (weight_only_dense(8, 128, 256, 64, target=DOTPROD), DOTPROD),
    "x86 w4a8 VNNI nibbles": lambda: (w4a8_dense(1, 128, 256, 64, target=ICELAKE), ICELAKE),
    "x86 w4a8 VNNI fold-k": lambda: (w4a8_dense(8, 128, 256, 64, target=ICELAKE), ICELAKE),
    "x86 w4a8 AVX2 block dot": lambda: (w4a8_dense(1, 128, 256, 64, target=HASWELL), HASWELL),
    "x86 w4a16 madd": lambda: (w4a16_dense(32, 128, 256, 64, target=ICELAKE, scheme="madd"), ICELAKE),
    "x86 w4a16 planes": lambda: (w4a16_dense(32, 128, 256, 64, target=ICELAKE, scheme="planes"), ICELAKE),
    "x86 weight-only GEMV": lambda: (x86_weight_only_dense(1, 128, 256, 64, target=ICELAKE), ICELAKE),
    "x86 weight-only GEMM": lambda: (x86_weight_only_dense(8, 128, 256, 64, target=ICELAKE), ICELAKE),
}


def workspace_sizes(llvm_ir: str) -> list[int]:
    """The byte counts of the module's TVMBackendAllocWorkspace calls (called through a loaded pointer)."""
    pointers = re.findall(r"(%[\w.]+) = load ptr, ptr @__TVMBackendAllocWorkspace", llvm_ir)
    return [
        int(size)
        for pointer in pointers
        for size in re.findall(rf"call ptr {re.escape(pointer)}\(i32 [^,]+, i32 [^,]+, i64 (\d+)", llvm_ir)
    ]


def test_a_local_tile_shows_up_as_a_small_workspace():
    """The check sees what it looks for: a kernel with a local-scope accumulator allocates it on the heap."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def local_tile(x: T.Buffer((64, 16), "float32"), y: T.Buffer((64,), "float32")):
        for i in T.parallel(64):
            acc = T.sblock_alloc_buffer((16,), "float32", scope="local")
            for j in range(16):
                acc[j] = x[i, j] * 2.0
            y[i] = acc[0] + acc[15]

    assert workspace_sizes(tvm.compile(local_tile, ICELAKE).mod.inspect_source("ll")) == [64]


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_buffer_below_the_stack_limit_is_heap_allocated(kernel):
    func, target = KERNELS[kernel]()
    sizes = workspace_sizes(tvm.compile(func, target).mod.inspect_source("ll"))
    assert all(size >= MAX_STACK_ALLOCA for size in sizes), sizes
