"""The aarch64 family's dense kernels and its choice among them: weight-only, and W4A8 / W4A16 with ``udot``.

:func:`dense_kernel` answers the target's kernel provider (:mod:`lpbq_tvm.kernels.interface`) on an
aarch64 target, for layers of 4-bit codes in blocks of whole dword pairs (``B % 16 == 0``):

* weight-only: the shared kernel of :mod:`lpbq_tvm.kernels.tiled.weight_only`, its GEMV (M = 1,
  nibbles decoded in registers as plain NEON code) or its GEMM (``float(q·k)`` of a tile decoded
  once, register tiles of 16 lanes);
* W4A8 / W4A16 without output requantization, on a CPU with the dot product (``+dotprod``): below
  ``Tuning.fold_k_min_rows`` rows of the uint8 kernel the lane-pair scheme of
  :mod:`lpbq_tvm.kernels.tiled` (the nibble scheme for a layer of one partial tile) with its ``udot``
  intrinsic (:mod:`.intrinsics`), from there :mod:`.fold_k` (``sdot`` over a tile decoded once) or
  :mod:`.mmla` (``usmmla``, with i8mm); W4A16 as two byte planes, ``K`` up to ``MAX_K``. The integer
  weights come in the layout of the chosen scheme (:func:`integer_weights`).

None otherwise (int8 per-channel layers, requantized outputs, integer layers on a CPU without
dotprod), and the generic kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.target import codegen

from lpbq_tvm.kernels.aarch64 import fold_k, mmla
from lpbq_tvm.kernels.aarch64.intrinsics import UDOT_LANES, udot_lane_pair_intrinsic, udot_nibble_intrinsic
from lpbq_tvm.kernels.generic import row_encodings
from lpbq_tvm.kernels.interface import DenseLayer, KernelChoice, Provenance, built
from lpbq_tvm.kernels.tiled import lane_pairs, nibble
from lpbq_tvm.kernels.tiled.integer import MAX_K, DotInstructions, build_byte_planes, encoding_inputs
from lpbq_tvm.kernels.tiled.repack import (
    LANES,
    check_shape,
    repack_w4a8,
    repack_w4a8_lane_pairs,
    repack_weight_only,
)
from lpbq_tvm.kernels.tiled.schedule import tile_lanes
from lpbq_tvm.kernels.tiled.weight_only import weight_only_gemm, weight_only_gemv
from lpbq_tvm.packing import pack

__all__ = ["TUNING", "Tuning", "dense_kernel", "integer_dense", "integer_weights", "is_aarch64", "weight_only_dense"]

KERNEL_NAME = "lpbq_dense_aarch64"


@dataclass(frozen=True)
class Tuning:
    """The aarch64 kernels' choices that change speed only (re-measure with ``benchmarks/bench_aarch64.py``)."""

    # Rows per register tile of the lane-pair and nibble schemes: x 16 udot accumulators of a 64-channel
    # tile, within NEON's 32 registers.
    nibble_rows: int = 1
    # The fold-k scheme (a tile's q·k decoded once) from this many rows of the uint8 kernel, and its
    # rows per register tile (x 4 sdot accumulators of 16 lanes).
    fold_k_min_rows: int = 4
    fold_rows: int = 4
    # With i8mm (usmmla), the matrix-multiply scheme replaces fold-k for an even number of rows; its
    # register tile in row pairs by lane pairs (x 2 x 2 accumulators each).
    mmla_row_pairs: int = 2
    mmla_lane_pairs: int = 8
    # The activation-code stage runs parallel from this many rows.
    parallel_code_rows: int = 64
    # Weight-only GEMM: the decoded float q·k of a whole 64-channel tile stays cache-resident up to
    # this size; above it, panels of whole blocks up to ``panel_k`` k-positions.
    whole_tile_bytes: int = 128 * 1024
    panel_k: int = 256
    # Weight-only GEMM: k-steps unrolled around a register tile (x then loads as vectors).
    gemm_k_unroll: int = 4


TUNING = (
    Tuning(),
    Provenance(
        "python benchmarks/bench_aarch64.py",
        "qemu-user 7.2 max CPU (instruction counts) on an Intel Xeon",
        "aarch64 layers, in instructions (emulated board)",
    ),
)

NEON_FLOATS = 4  # floats per NEON register
GEMM_WIDTH = 16  # lanes of a weight-only GEMM register tile: 4 NEON registers per row


def is_aarch64(target: tvm.target.Target) -> bool:
    """An LLVM target for 64-bit Arm (its ``mtriple``, or the host's)."""
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    return target.kind.name == "llvm" and triple.startswith("aarch64")


def dense_kernel(layer: DenseLayer, target: tvm.target.Target) -> KernelChoice | None:
    """The scheduled kernel for ``layer`` on ``target`` and its weights (``lpbq_qw``, ``lpbq_kw``,
    ``lpbq_wsum``, ``lpbq_s``, ``lpbq_sx``, ``lpbq_zx``), or None where this family does not serve it (module
    docstring)."""
    integer, encoding = layer.integer, layer.encoding
    if not is_aarch64(target) or encoding.bitwidth > 4 or encoding.block_size % 16:
        return None
    packed = pack(encoding)
    rows, channels, depth, block = layer.rows, layer.channels, layer.depth, encoding.block_size
    if integer is None:
        qw, kw = repack_weight_only(packed.q, packed.k, channels, depth, block)
        func = built(weight_only_dense, rows, channels, depth, block, layer.has_bias, target=target)
        return KernelChoice(func, {"lpbq_qw": qw, "lpbq_kw": kw, "lpbq_s": packed.scale}, KERNEL_NAME)
    if not codegen.target_has_features("dotprod", target) or integer.output_encoding is not None or depth > MAX_K:
        return None
    x = integer.input_encoding
    qw, kw, wsum = integer_weights(rows, channels, depth, block, x.bitwidth, packed.q, packed.k, target)
    func = built(
        integer_dense, rows, channels, depth, block, x.bitwidth, layer.has_bias, target=target, rowwise=integer.rowwise
    )
    weights = {"lpbq_qw": qw, "lpbq_kw": kw, "lpbq_wsum": wsum, "lpbq_s": packed.scale}
    return KernelChoice(func, weights | encoding_inputs(x), KERNEL_NAME, row_encodings if integer.rowwise else None)


def weight_only_dense(M: int, N: int, K: int, B: int, with_bias: bool = False, *, target) -> tirx.PrimFunc:
    """Scheduled weight-only kernel ``main(x, qw, kw, s, [bias], y)`` (:mod:`lpbq_tvm.kernels.tiled.weight_only`):
    the GEMV at M = 1, else the GEMM."""
    tune = TUNING[0]
    if M == 1:
        return weight_only_gemv(M, N, K, B, with_bias, chunk=GEMM_WIDTH, lut_intrinsic=None, lut_rows=1)
    return weight_only_gemm(
        M, N, K, B, with_bias, width=GEMM_WIDTH, register_lanes=NEON_FLOATS,
        whole_tile_bytes=tune.whole_tile_bytes, panel_k=tune.panel_k, target=target, k_unroll=tune.gemm_k_unroll,
    )  # fmt: skip


def integer_dense(
    M: int, N: int, K: int, B: int, bits: int, with_bias: bool = False, *, target, rowwise: bool = False
) -> tirx.PrimFunc:
    """Scheduled W4A8 (``bits = 8``) or W4A16 (16) kernel ``main(x, qw, kw, wsum, s, sx, zx, [bias], y)``
    (:mod:`lpbq_tvm.kernels.tiled.integer`; the input's scale and zero point are run-time values; ``rowwise``:
    ``main(x, sx, zx, ...)``, an encoding per row, mode ``w4a8-dynamic``): the
    scheme of :func:`_integer_scheme` (its weights from :func:`integer_weights`)."""
    check_shape(N, K, B)
    if B % 16 or K > MAX_K:
        msg = f"the aarch64 integer kernels need B % 16 == 0 and K <= {MAX_K}; got K={K}, B={B}"
        raise ValueError(msg)
    udot = DotInstructions("udot", UDOT_LANES, udot_nibble_intrinsic(), udot_lane_pair_intrinsic())
    scheme = _integer_scheme(M, N, B, bits, target)
    return build_byte_planes(M, N, K, B, bits, with_bias, target, TUNING[0], udot, scheme, rowwise)


def integer_weights(M: int, N: int, K: int, B: int, bits: int, q_packed, k_packed, target):
    """``(qw, kw, wsum)`` of the canonical storage in the layout :func:`integer_dense`'s scheme reads."""
    lane_pair_layout = _integer_scheme(M, N, B, bits, target) is lane_pairs
    return (repack_w4a8_lane_pairs if lane_pair_layout else repack_w4a8)(q_packed, k_packed, N, K, B)


def _integer_scheme(M: int, N: int, B: int, bits: int, target):
    """Few rows: lane pairs over whole 64-channel tiles (blocks up to ``lane_pairs.MAX_B``), else
    nibbles; from ``Tuning.fold_k_min_rows`` rows (of the uint8 kernel) ``usmmla`` on row pairs with
    i8mm, else fold-k."""
    rows = bits // 8 * M
    if rows < TUNING[0].fold_k_min_rows:
        return lane_pairs if tile_lanes(N, UDOT_LANES) == LANES and B <= lane_pairs.MAX_B else nibble
    if rows % 2 == 0 and codegen.target_has_features("i8mm", target):
        return mmla
    return fold_k
