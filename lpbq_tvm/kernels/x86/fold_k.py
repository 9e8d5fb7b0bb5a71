"""The fold-k scheme of the x86 uint8 kernel: ``q·k`` of a tile decoded once, one VNNI accumulation over K.

The int8 weight ``q·k`` of a whole 64-channel tile (K · 64 bytes) is decoded once, then every row
accumulates it with ``vpdpbusd`` in int32, with no per-block step. Taken with VNNI from
``Tuning.fold_k_min_rows`` rows, and for B = 8 where the nibble scheme cannot run. ``q·k`` reaches
−128, which pmaddubsw would saturate on: this scheme needs VNNI or plain vector code.
"""

from __future__ import annotations

from tvm import te
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.tiled.integer import Problem, folded_dot
from lpbq_tvm.kernels.tiled.schedule import decode_by_block, epilogue_at, parallel, row_tile, tensorize_or_vectorize
from lpbq_tvm.kernels.x86.intrinsics import vnni_intrinsic

__all__ = ["accumulate", "schedule"]


def accumulate(p: Problem) -> te.Tensor:
    return folded_dot(p, 0)


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, [decode int8 q·k of the tile], mo, g, h, mi, tile4, (c16, j4) = vpdpbusd): Acc in registers."""
    blk_wd, blk_acc = sch.get_sblock("Wd"), sch.get_sblock("Acc")
    m, t, lane, g, h, j = sch.get_loops(blk_acc)
    mo, mi = sch.split(m, [None, row_tile(p.rows, p.tune.nibble_rows)])
    tile, c = sch.split(lane, [None, 16])
    sch.reorder(t, mo, g, h, mi, tile, c, j)
    sch.compute_at(blk_wd, t)
    epilogue_at(sch, t)
    wd_h, wd_lane = decode_by_block(sch, blk_wd, p, by_lane=False)
    sch.vectorize(wd_lane)
    sch.unroll(wd_h)
    parallel(sch, t, mo, p.target)
    intrinsic = vnni_intrinsic() if p.dot.name else None
    tensorize_or_vectorize(sch, blk_acc, c, j, g, intrinsic, [h, mi, tile])
