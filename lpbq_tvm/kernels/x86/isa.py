"""What the x86 kernels read off a TVM target: whether it is x86-64, its vector registers, its dot products."""

from __future__ import annotations

import tvm
from tvm.target import codegen

from lpbq_tvm.kernels.schedule_rules import RegisterFile

__all__ = ["BLOCK_DOT_INSTRUCTIONS", "dot_instructions", "is_x86", "register_dwords", "register_file"]

# instructions -> (pmaddubsw, pmaddwd, int32 lanes): the int16 block-dot and madd intrinsics (no VNNI)
BLOCK_DOT_INSTRUCTIONS = {
    "avx512bw": ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512", 16),
    "avx2": ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", 8),
}


def is_x86(target: tvm.target.Target) -> bool:
    """An LLVM target for x86-64 (the host's, unless another ``mtriple`` is named)."""
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    return target.kind.name == "llvm" and triple.startswith("x86_64")


def register_dwords(target: tvm.target.Target) -> int:
    """32-bit lanes (floats or dwords) of the target's vector registers: 16 (zmm) with AVX-512, else 8."""
    return 16 if codegen.target_has_features("avx512f", target) else 8


def register_file(target: tvm.target.Target) -> RegisterFile:
    """The vector registers the schedule rules tile for: 32 zmm (24 for accumulators) with AVX-512,
    else 16 ymm (14 for accumulators)."""
    if codegen.target_has_features("avx512f", target):
        return RegisterFile(lanes=16, registers=32, spare=8)
    return RegisterFile(lanes=8, registers=16, spare=2)


def dot_instructions(target: tvm.target.Target) -> str | None:
    """``"vnni"`` / ``"avx512bw"`` / ``"avx2"`` from the target's features, or None (plain vector code)."""
    for feature, instructions in (("avx512vnni", "vnni"), ("avx512bw", "avx512bw"), ("avx2", "avx2")):
        if codegen.target_has_features(feature, target):
            return instructions
    return None
