"""The fold-k scheme of the aarch64 uint8 kernel: ``q·k`` of a tile decoded once, ``sdot`` over K.

For many rows the nibble scheme decodes a tile's weights again for every row. Here the int8 weight
``q·k`` of a whole 64-channel tile is decoded once into a local buffer (as x86's fold-k does), then
every row accumulates ``Σ (xq − 128) · q·k`` with ``sdot``: the codes become signed bytes by one
``eor`` per four, shared by all lanes, and the ``128 · Σ q·k`` this leaves out is the weights'
``wsum`` again (``CODE_OFFSET``: :func:`lpbq_tvm.kernels.tiled.integer.build_byte_planes` adds it back
with the zero point). Exact in int32 (|Σ| <= 128 · 128 · K). Register tiles of
``Tuning.fold_rows`` rows by 16 lanes (4 ``sdot`` accumulators per row); each weight register
serves the tile's rows.
"""

from __future__ import annotations

from tvm import te
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.aarch64.intrinsics import sdot_halves_intrinsic
from lpbq_tvm.kernels.tiled.integer import Problem, folded_dot
from lpbq_tvm.kernels.tiled.schedule import decode_by_block, epilogue_at, parallel, row_tile

__all__ = ["CODE_OFFSET", "accumulate", "schedule"]

CODE_OFFSET = 128  # the accumulator sums (xq − 128) · q·k
TILE_LANES = 16  # lanes of a register tile: 4 sdot accumulators per row (fewer where a partial tile has fewer)


def accumulate(p: Problem) -> te.Tensor:
    return folded_dot(p, CODE_OFFSET)


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, [decode the tile], lane16, mo, g, mi, c4, (h2, c4, j4) = two sdot): mi x 4 accumulators."""
    blk_wd, blk_acc = sch.get_sblock("Wd"), sch.get_sblock("Acc")
    m, t, lane, g, h, j = sch.get_loops(blk_acc)
    mo, mi = sch.split(m, [None, row_tile(p.rows, p.tune.fold_rows, p.planes)])
    width = next(w for w in (TILE_LANES, 2 * p.dot.lanes, p.dot.lanes) if p.lanes % w == 0)  # tensorize: no tails
    group, tile, c = sch.split(lane, [None, width // p.dot.lanes, p.dot.lanes])
    sch.reorder(t, group, mo, g, mi, tile, h, c, j)
    sch.compute_at(blk_wd, t)
    epilogue_at(sch, t)
    wd_h, wd_lane = decode_by_block(sch, blk_wd, p, by_lane=False)
    sch.vectorize(wd_lane)
    sch.unroll(wd_h)
    parallel(sch, t, None, p.target)
    sch.decompose_reduction(blk_acc, g)
    sch.tensorize(h, sdot_halves_intrinsic())
    for loop in (mi, tile):
        sch.unroll(loop)
