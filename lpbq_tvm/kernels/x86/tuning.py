"""The tuning of the x86 kernels, per CPU: one table of the choices measured, not derived.

Each field is a crossover or size chosen by timing the kernels on the hosts the project has run
on; each entry of the table names the benchmark, the host and the section of ``docs/performance.md``
with the numbers (:class:`~lpbq_tvm.kernels.interface.Provenance`). They change speed only: every
choice computes the same result, bit for bit in the integer modes. Re-measure a change with
``benchmarks/bench_kernels.py`` (single layers) and ``benchmarks/bench_pipeline.py`` (models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lpbq_tvm.kernels.interface import Provenance

__all__ = ["TUNINGS", "Tuning", "tuning"]


@dataclass(frozen=True)
class Tuning:
    # Weight-only GEMV: rows that share one in-register decode (x 4 tiles = 16 FMA chains), and the
    # largest M it takes with the vpermps LUT intrinsic (the GEMM, which decodes once to a local
    # tile, wins above).
    lut_rows: int = 4
    gemv_max_m: int = 16
    # Weight-only GEMM and the madd scheme: the decoded float q·k of a whole 64-channel tile stays
    # L2-resident up to this size; above it, panels of whole blocks up to ``panel_k`` k-positions.
    whole_tile_bytes: int = 128 * 1024
    panel_k: int = 256
    # W4A8 nibble scheme: rows per register tile (x 4 tiles of 16 channels = 16 zmm accumulators).
    nibble_rows: int = 4
    # VNNI: the fold-k scheme (q·k of a tile decoded once, one vpdpbusd accumulation over K) from
    # this many rows of the uint8 kernel.
    fold_k_min_rows: int = 24
    # Block-dot schemes: from this many rows, a tile's signed bytes are decoded once into a local
    # buffer instead of in registers per row group.
    decoded_min_rows: int = 16
    # A streaming GEMV (one row group: the block-dot, nibble and LUT intrinsics) prefetches its nibbles
    # this many dword rows ahead (at 64 lanes, 256 bytes a row); the hardware prefetcher alone left it
    # waiting on memory.
    prefetch_rows: int = 32
    # The activation-code stage runs parallel from this many rows.
    parallel_code_rows: int = 64
    # W4A16: the madd scheme (pmaddwd on int16 codes) from this many rows; None keeps the byte
    # planes of the uint8 kernel. Only where vector integer multiplies run at half width on one pipe
    # (Zen 1) does one pmaddwd per 16 MACs beat two pmaddubsw per 32.
    madd_min_rows: int | None = None


_DEFAULT = Tuning()
# LLVM CPU name ("" for any other) -> the tuning measured for it.
TUNINGS: dict[str, tuple[Tuning, Provenance]] = {
    "": (
        _DEFAULT,
        Provenance(
            "python benchmarks/bench_kernels.py; python benchmarks/bench_pipeline.py",
            "Intel Xeon, 2 vCPUs, AVX-512 VNNI (LLVM rocketlake)",
            "LPBQ dense layers",
        ),
    ),
    "znver1": (
        dataclasses.replace(_DEFAULT, madd_min_rows=16),
        Provenance("python benchmarks/bench_pipeline.py", "AMD EPYC 7001, 2 vCPUs (LLVM znver1)", "Zen 1 tuning"),
    ),
}


def tuning(target) -> Tuning:
    """The tuning of ``target``'s CPU (its ``mcpu``), the default where none is recorded."""
    return TUNINGS.get(str(target.attrs.get("mcpu", "")), TUNINGS[""])[0]
