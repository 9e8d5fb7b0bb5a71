"""AArch64 Linux cross build: a deployment bundle for a 64-bit Arm board, checked against the board's CPU.

The target is ``llvm`` with ``mtriple=aarch64-linux-gnu`` and ``+neon,+dotprod`` (Armv8.2 dot
product, present on every Snapdragon since the 845); ``aarch64-i8mm`` adds ``+i8mm`` (Armv8.6 int8
matrix multiply: Snapdragon 8 Gen 1 and later, Cortex-A510/A710/X2 on). With the cross linker
(``aarch64-linux-gnu-g++``, Debian's ``g++-aarch64-linux-gnu``; ``tools/arm64_device.sh setup``
installs it) the bundle's library is a linked shared object the board's TVM runtime loads as is (over
RPC: ``lpbq-tvm run --rpc``); without it, a ``.tar`` of object files to link on the board. It does
not run on the build machine.

A library built for ``+dotprod`` dies of SIGILL on a CPU without it. So the bundle also carries
``cpu_features.so``, a probe built for plain NEON that returns the board's ``AT_HWCAP`` /
``AT_HWCAP2``; :meth:`AArch64.check_device` runs it on the board first and names what is missing.

LPBQ layers take the kernels of :mod:`lpbq_tvm.kernels.aarch64` (NEON weight-only, ``udot`` / ``sdot``
W4A8 and W4A16, ``usmmla`` for many rows with i8mm) where that family serves them, the generic kernels
otherwise; convs stay channels-first, and the schedule rules tile for NEON's 32 registers of 4 floats.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import tvm
from tvm.script import tirx as T
from tvm.support import cc

from lpbq_tvm.kernels import aarch64
from lpbq_tvm.kernels.schedule_rules import RegisterFile
from lpbq_tvm.targets.base import Target

__all__ = ["AArch64", "AArch64I8mm", "HWCAPS", "missing_features"]

log = logging.getLogger(__name__)

TRIPLE = "aarch64-linux-gnu"
NEON = RegisterFile(lanes=4, registers=32, spare=8)
CROSS_LINKER = "aarch64-linux-gnu-g++"
PROBE_LIBRARY = "cpu_features.so"
PROBE_FUNCTION = "lpbq_hwcaps"

# LLVM feature -> (auxv word: 0 AT_HWCAP, 1 AT_HWCAP2; bit), from Linux's arch/arm64 uapi asm/hwcap.h.
HWCAPS: dict[str, tuple[int, int]] = {
    "neon": (0, 1),  # HWCAP_ASIMD
    "fullfp16": (0, 10),  # HWCAP_ASIMDHP
    "dotprod": (0, 20),  # HWCAP_ASIMDDP
    "sve": (0, 22),  # HWCAP_SVE
    "sve2": (1, 1),  # HWCAP2_SVE2
    "i8mm": (1, 13),  # HWCAP2_I8MM
    "bf16": (1, 14),  # HWCAP2_BF16
}


@T.prim_func
def _hwcaps(out: T.Buffer((2,), "int64")):
    T.func_attr({"global_symbol": PROBE_FUNCTION, "tirx.noalias": True})
    out[0] = T.call_extern("int64", "getauxval", T.int64(16))  # AT_HWCAP
    out[1] = T.call_extern("int64", "getauxval", T.int64(26))  # AT_HWCAP2


def missing_features(required: list[str], hwcaps: tuple[int, int]) -> list[str]:
    """The features of ``required`` (LLVM names, e.g. ``dotprod``) that auxv words ``hwcaps`` lack."""
    unknown = sorted(set(required) - HWCAPS.keys())
    if unknown:
        raise ValueError(f"no HWCAP bit known for {', '.join(unknown)}; known: {', '.join(HWCAPS)}")
    return [name for name in required if not hwcaps[HWCAPS[name][0]] >> HWCAPS[name][1] & 1]


class AArch64(Target):
    name = "aarch64"
    kernel_families = (aarch64,)
    mattr: tuple[str, ...] = ("+neon", "+dotprod")

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mattr": list(self.mattr)})

    def register_file(self, tvm_target: tvm.target.Target) -> RegisterFile:
        return NEON

    def linker(self):
        if shutil.which(CROSS_LINKER) is None:
            msg = (
                f"linking an aarch64 shared library needs {CROSS_LINKER} (apt-get install g++-aarch64-linux-gnu, "
                "or tools/arm64_device.sh setup); a .tar of objects needs no linker"
            )
            raise RuntimeError(msg)
        return cc.cross_compiler(CROSS_LINKER)

    def write_library(self, executable, directory: Path) -> dict[str, Any]:
        if shutil.which(CROSS_LINKER) is None:
            log.warning("%s not found: the bundle holds model.tar, objects to link on the board", CROSS_LINKER)
            executable.export_library(str(directory / "model.tar"))
            return {"library": "model.tar"}
        linker = self.linker()
        executable.export_library(str(directory / "model.so"), fcompile=linker)
        probe_target = tvm.target.Target({"kind": "llvm", "mtriple": TRIPLE, "mattr": ["+neon"]})
        probe = tvm.compile(tvm.IRModule({PROBE_FUNCTION: _hwcaps}), target=probe_target)
        probe.export_library(str(directory / PROBE_LIBRARY), fcompile=linker)
        required = [feature.lstrip("+") for feature in self.mattr]
        return {"library": "model.so", "cpu_features": {"probe": PROBE_LIBRARY, "requires": required}}

    def check_device(self, session, directory: Path, manifest: dict[str, Any]) -> None:
        features = manifest.get("cpu_features")
        if features is None:
            return
        session.upload(str(directory / features["probe"]))
        out = tvm.runtime.empty((2,), "int64", session.cpu())
        session.load_module(features["probe"])[PROBE_FUNCTION](out)
        hwcaps = tuple(int(word) for word in out.numpy())
        missing = missing_features(features["requires"], hwcaps)
        if missing:
            msg = (
                f"the device's CPU lacks {', '.join(missing)} (HWCAP {hwcaps[0]:#x}, HWCAP2 {hwcaps[1]:#x}), which "
                f"{manifest['library']} was built for ({', '.join(features['requires'])}): it would die of SIGILL"
            )
            raise ValueError(msg)


class AArch64I8mm(AArch64):
    """:class:`AArch64` for CPUs with the int8 matrix multiply (Armv8.6 i8mm) as well."""

    name = "aarch64-i8mm"
    mattr = (*AArch64.mattr, "+i8mm")
