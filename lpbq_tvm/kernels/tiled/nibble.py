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

__all__ = ["accumulate", "schedule"]


def accumulate(p: Problem) -> te.Tensor:
    B, nb, xq, qw, kw = p.B, p.K // p.B, p.xq, p.qw, p.kw
    r = te.reduce_axis((0, B), "r")
    xqs = te.compute((p.rows, nb), lambda m, b: te.sum(xq[m, b * B + r].astype("int32"), axis=r), name="xqs")
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
    M = p.rows
    blk_pi, blk_acc = sch.get_sblock("Pi"), sch.get_sblock("Acc")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = row_tile(M, p.tune.nibble_rows, p.planes)
    if mi < M:
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, mo, b, m_in, lane)
        outer = mo
    else:
        sch.reorder(t, b, m, lane)
        outer = t
    sch.compute_at(blk_pi, b)
    depth = 3 if mi < M else 2
    for blk in (blk_pi, blk_acc):
        sch.set_scope(blk, 0, "local")
    epilogue_at(sch, outer)
    inner = sch.get_loops(blk_pi)[depth:]  # (m,) lane, gg, jj — compute_at drops a unit m loop
    rows, (p_lane, p_g, p_j) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, p.dot.lanes])
    sch.reorder(p_g, *rows, p_tile, p_c, p_j)
    sch.vectorize(lane)
    parallel(sch, t, mo if mi < M else None, p.target)
    tensorize_or_vectorize(sch, blk_pi, p_c, p_j, p_g, p.dot.nibble_intrinsic, [*rows, p_tile])
    sch.decompose_reduction(blk_acc, b)
