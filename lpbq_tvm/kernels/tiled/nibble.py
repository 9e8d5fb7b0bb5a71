"""The nibble scheme of the uint8 kernel: dot products on the nibbles as stored, a per-block correction.

Per block b and 64-channel tile, ``Pi = Σ xq · u`` with ``u = q + 8`` (0..15) decoded in registers by
the family's nibble intrinsic (``DotInstructions.nibble_intrinsic``: x86 two ``vpdpbusd`` per load of
16 dwords, aarch64 two ``udot`` per load of 4), then ``Acc += k_b · (Pi − 8 Σ_b xq)``. Without a
tensor intrinsic, the same loops as plain vector code. It needs blocks of two dwords or more (B >= 16).
"""

from __future__ import annotations

from tvm import te
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.tiled.decode import byte, k_value, nibbles
from lpbq_tvm.kernels.tiled.integer import Problem
from lpbq_tvm.kernels.tiled.schedule import epilogue_at, parallel, row_tile, tensorize_or_vectorize

__all__ = ["accumulate", "block_sums", "per_block_loops", "schedule"]


def block_sums(p: Problem) -> te.Tensor:
    """``xqs [rows, nb]``: each row's sum of codes per block (the correction of the offset ``u = q + 8``)."""
    r = te.reduce_axis((0, p.B), "r")
    return te.compute(
        (p.rows, p.K // p.B), lambda m, b: te.sum(p.xq[m, b * p.B + r].astype("int32"), axis=r), name="xqs"
    )


def accumulate(p: Problem) -> te.Tensor:
    B, nb, xq, qw, kw = p.B, p.K // p.B, p.xq, p.qw, p.kw
    xqs = block_sums(p)
    gg, jj = te.reduce_axis((0, B // 8), "gg"), te.reduce_axis((0, 4), "jj")

    def term(m, t, b, lane, hh):
        u = nibbles(qw[t, b * (B // 8) + gg, lane], hh).astype("int32")
        return xq[m, b * B + 8 * gg + 4 * hh + jj].astype("int32") * byte(u, jj)

    pi = te.compute(
        (p.rows, p.tiles, nb, p.lanes),
        lambda m, t, b, lane: te.sum(term(m, t, b, lane, 0) + term(m, t, b, lane, 1), axis=[gg, jj]),
        name="Pi",
    )
    bb = te.reduce_axis((0, nb), "bb")
    return te.compute(
        (p.rows, p.tiles, p.lanes),
        lambda m, t, lane: te.sum((pi[m, t, bb, lane] - xqs[m, bb] * 8) * k_value(kw, t, bb, "int32")(lane), axis=bb),
        name="Acc",
    )


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, (mo,) b, [Pi: gg, (mi,) tile4, (c16, j4) = one VNNI nibble intrinsic], Acc += k·(Pi − 8Σxq)),
    then the epilogue of the ``mi`` rows.

    The nibble decode (and, shift, and) happens in registers, once per row group of ``mi`` rows
    (LLVM shares it across the unrolled rows): ``mi x 4`` zmm accumulators. Row groups are outside
    the blocks, so ``Acc`` is ``mi x 64`` (not ``M x 64``, megabytes at large M) and each group
    re-reads the tile's weights (32·K bytes) from cache; ``mi`` is a multiple of the byte ``planes``
    of a row, so the epilogue finds both planes in its group.
    """
    blk_pi = sch.get_sblock("Pi")
    inner = per_block_loops(sch, p, blk_pi)  # (m,) lane, gg, jj
    rows, (p_lane, p_g, p_j) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, p.dot.lanes])
    sch.reorder(p_g, *rows, p_tile, p_c, p_j)
    tensorize_or_vectorize(sch, blk_pi, p_c, p_j, p_g, p.dot.nibble_intrinsic, [*rows, p_tile])


def per_block_loops(sch: Schedule, p: Problem, blk_block, lane_halves: bool = False):
    """The loop nest the per-block schemes share: ``Acc``'s loops as (t ∥, (mo,) b, (mi,) lane) with
    ``mi = row_tile(rows, Tuning.nibble_rows)`` rows per register tile, the block-level sums
    ``blk_block`` computed at ``b``, both local, the epilogue per row group; ``Acc`` vectorized over
    lanes (``lane_halves``: as two unrolled halves, for a scheme whose lanes < 32 and >= 32 differ),
    its reduction decomposed. Returns ``blk_block``'s loops under ``b`` (a unit row loop dropped by
    ``compute_at``)."""
    M = p.rows
    blk_acc = sch.get_sblock("Acc")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = row_tile(M, p.tune.nibble_rows, p.planes)
    mo = None
    if mi < M:
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, mo, b, m_in, lane)
    else:
        sch.reorder(t, b, m, lane)
    sch.compute_at(blk_block, b)
    epilogue_at(sch, t if mo is None else mo)
    inner = sch.get_loops(blk_block)[2 if mo is None else 3 :]  # (before parallel fuses t and mo)
    if lane_halves:
        half, lane = sch.split(lane, [2, None])
        sch.unroll(half)
    sch.vectorize(lane)
    parallel(sch, t, mo, p.target)
    sch.decompose_reduction(blk_acc, b)
    return inner
