"""What a compilation target is: the TVM target, the Relax pipeline, the kernels of its LPBQ layers.

A target is a :class:`Target` subclass with one instance in the registry (:mod:`lpbq_tvm.targets`).
Its parts, each a one-line decision in the subclass:

* :meth:`Target.tvm_target` — the ``tvm.target.Target`` to compile for;
* :meth:`Target.register_file` — the vector registers the schedule rules tile for;
* :attr:`Target.kernel_families` — the kernel families (:class:`~lpbq_tvm.kernels.interface.KernelFamily`,
  e.g. :mod:`lpbq_tvm.kernels.x86`) asked, in order, for each LPBQ dense layer; a layer none of
  them takes runs the generic kernel;
* :meth:`Target.pipeline` — the Relax pipeline (by default :func:`~lpbq_tvm.targets.pipeline.cpu_pipeline`);
* :meth:`Target.device` — where its artifacts run in this process (None: on their device);
* :meth:`Target.linker`, :meth:`Target.write_library` — how its bundle's library is linked and written;
* :meth:`Target.check_device` — what to check on a device (over RPC) before loading the library there;
* ``modes`` it builds, ``channels_last`` (2-D convs in NHWC,
  :mod:`lpbq_tvm.passes.channels_last`) and ``requantize_outputs`` (HTP style: compile the QNN
  export's Q/DQ graph, LPBQ layers requantizing their outputs).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import tvm

from lpbq_tvm.kernels.interface import DenseLayer, KernelChoice, KernelProvider
from lpbq_tvm.kernels.schedule_rules import RegisterFile
from lpbq_tvm.modes import LPBQ_MODES
from lpbq_tvm.targets.pipeline import cpu_pipeline

__all__ = ["Target"]


class Target:
    """A compilation target; see the module docstring."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = tuple(LPBQ_MODES)
    channels_last: ClassVar[bool] = False
    requantize_outputs: ClassVar[bool] = False
    kernel_families: ClassVar[tuple[ModuleType, ...]] = ()

    def tvm_target(self) -> tvm.target.Target:
        raise NotImplementedError

    def register_file(self, tvm_target: tvm.target.Target) -> RegisterFile:
        raise NotImplementedError

    def device(self) -> tvm.runtime.Device | None:
        """Where artifacts of this target run in this process (None: they do not run here)."""
        return None

    def linker(self):
        """What links this target's shared libraries (``export_library``'s ``fcompile``; None: the host's compiler)."""
        return None

    def write_library(self, executable, directory: Path) -> dict[str, Any]:
        """Write ``executable`` into the bundle ``directory``; the manifest entries that describe what was
        written (``library``: the file name, and whatever :meth:`check_device` reads)."""
        executable.export_library(str(directory / "model.so"), fcompile=self.linker())
        return {"library": "model.so"}

    def check_device(self, session, directory: Path, manifest: dict[str, Any]) -> None:
        """Raise ``ValueError`` when the device of the RPC ``session`` cannot run the bundle in ``directory``
        (called before its library is loaded there). Nothing to check by default."""

    def pipeline(self, tvm_target: tvm.target.Target | None = None, database=None) -> tvm.transform.Pass:
        """The Relax pipeline to compile with (``database``: MetaSchedule's tuned schedules, applied first)."""
        tvm_target = tvm_target or self.tvm_target()
        return cpu_pipeline(tvm_target, self.register_file(tvm_target), database)

    def kernel_provider(self, tvm_target: tvm.target.Target | None = None) -> KernelProvider | None:
        """The provider LowerLPBQ asks for each dense LPBQ layer: the first of :attr:`kernel_families`
        that takes it (None without families)."""
        if not self.kernel_families:
            return None
        return functools.partial(_first_kernel, self.kernel_families, tvm_target or self.tvm_target())


def _first_kernel(families, tvm_target: tvm.target.Target, layer: DenseLayer) -> KernelChoice | None:
    return next((c for family in families if (c := family.dense_kernel(layer, tvm_target)) is not None), None)
