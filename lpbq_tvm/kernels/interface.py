"""What a kernel family is asked and what it answers: the seam between LowerLPBQ and the targets.

:class:`~lpbq_tvm.passes.lower_lpbq.LowerLPBQ` describes each LPBQ layer it could hand to a
scheduled kernel as a :class:`DenseLayer` (a conv arrives as the dense layer over its im2col
columns) and asks the target's :data:`KernelProvider`. A kernel family (``kernels/x86``, one
day another) answers with a :class:`KernelChoice`, or None, and the layer then takes the
generic kernel of :mod:`lpbq_tvm.kernels.generic`.

The call contract of a chosen kernel: ``func(x, *weights.values(), [bias], y)`` with ``x`` float32
``[rows, depth]``, ``bias`` float32 ``[channels]`` and ``y`` float32 ``[rows, channels]``; the
arithmetic is that of docs/design.md §3 for the layer's mode (bit-exact in the integer modes). A
choice with ``row_encodings`` (mode ``w4a8-dynamic``) takes the two tensors ``row_encodings(x)`` (each row's
scale and zero point) right after ``x``.

A family's choices that change speed only (crossovers, tile sizes) are measured, not derived: each
table of them carries its :class:`Provenance`. A family builds its kernels through :func:`built`, so
the layers of one shape (a decoder's 30 q projections) share one scheduled function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding
from lpbq_tvm.encoder import LPBQEncoding

__all__ = [
    "FUSABLE_OUTPUT",
    "SEPARATE_ROUNDING",
    "DenseLayer",
    "IntegerArithmetic",
    "KernelChoice",
    "Provenance",
    "KernelFamily",
    "KernelProvider",
    "built",
]

# Block annotations, set by kernels and read by the schedule rules (kernels/schedule_rules.py):
# a scheduled kernel's output block, into which the elementwise ops fused after it may be inlined;
FUSABLE_OUTPUT = "lpbq.fusable_output"
# an epilogue stage whose roundings must stay separate (never merged into one FMA with its neighbours).
SEPARATE_ROUNDING = "lpbq.separate_rounding"


@dataclass(frozen=True)
class IntegerArithmetic:
    """Integer kernel settings: the input encoding (calibrated, or one per row at run time) and, for
    requantized outputs, the output encoding."""

    input_encoding: ActivationEncoding | RowwiseEncoding
    output_encoding: ActivationEncoding | None = None
    pre_bias_encoding: ActivationEncoding | None = None  # requantize before the bias add too (QNN MatMul + Add)

    @property
    def rowwise(self) -> bool:
        """Whether the input has an encoding per row, computed at run time (mode ``w4a8-dynamic``)."""
        return isinstance(self.input_encoding, RowwiseEncoding)

    @property
    def accumulator(self) -> str:
        """int32 for 8-bit activations; int64 for 16-bit (65535 · 128 · K overflows int32 from K = 256)."""
        return "int32" if self.input_encoding.bitwidth <= 8 else "int64"


@dataclass(frozen=True)
class DenseLayer:
    """An LPBQ layer as a dense product ``y[rows, channels] = x[rows, depth] · W^T``.

    ``encoding`` is the weight's in the canonical ``[channels, depth]`` view (a conv's in tap-major
    im2col order); ``integer`` is None in weight-only mode.
    """

    rows: int
    depth: int
    encoding: LPBQEncoding
    has_bias: bool
    integer: IntegerArithmetic | None

    @property
    def channels(self) -> int:
        return self.encoding.num_channels


@dataclass(frozen=True)
class KernelChoice:
    """A scheduled kernel for a :class:`DenseLayer` and the weight arrays it reads, by parameter suffix
    (the lowered module names them ``<weight>.<suffix>``), in call order."""

    func: object  # tvm.tirx.PrimFunc
    weights: dict[str, np.ndarray]
    name: str  # the kernel's name in the module, e.g. "lpbq_dense_x86"
    row_encodings: Callable | None = None  # TE: x [rows, depth] -> its rows' (scales, zero points), the next arguments


class KernelFamily(Protocol):
    """A kernel family module: ``dense_kernel(layer, target)``, None for layers or targets it does not serve."""

    def dense_kernel(self, layer: DenseLayer, target: object) -> KernelChoice | None: ...


KernelProvider = Callable[[DenseLayer], "KernelChoice | None"]


@dataclass(frozen=True)
class Provenance:
    """Where a kernel family's tuning was measured: re-run ``command`` on a host like ``host`` to revisit it."""

    command: str  # the benchmark, run from the repository root
    host: str  # the CPU it ran on (as the benchmark's host line prints it)
    record: str  # the heading of the docs/performance.md section that holds the numbers


@functools.lru_cache(maxsize=256)
def built(build: Callable, *args, **kwargs):
    """``build(*args, **kwargs)``, scheduled once per arguments and shared (a PrimFunc is immutable): a kernel
    depends on its layer's shape and the target, not on its weights. A ``tvm.target.Target`` compares by
    identity, so the layers of one lowering, which share their target object, share their kernels."""
    return build(*args, **kwargs)
