"""The matrix-multiply scheme of the aarch64 uint8 kernel: ``usmmla`` (i8mm) on row pairs and lane pairs.

As in :mod:`.fold_k`, the int8 weight ``q·k`` of a 64-channel tile is decoded once into a local
buffer, here with each lane's eight bytes of a k-step ``g`` adjacent (``int8_tile(by_lane=True)``),
and the codes are copied once into row pairs (``XqPairs [rows/2, K/8, 2, 8]``: a pair's 16 bytes of
``g`` adjacent). One ``usmmla`` (Armv8.6 int8 matrix multiply) then multiplies the 2 x 8 unsigned
codes of two rows by the 8 x 2 signed ``q·k`` of two lanes into a 2 x 2 int32 accumulator, each
operand one load: 32 multiply-accumulates an
instruction where ``sdot`` does 16, and the codes need no sign flip (no ``CODE_OFFSET``). Exact in
int32 (|Σ| <= 255 · 128 · K up to ``MAX_K``).

The accumulator is computed as ``AccPairs [rows/2, NT, lanes/2, 2, 2]`` (the instruction's layout) and
copied per tile into the ``Acc [rows, NT, lanes]`` the output block reads. Register tiles of
``Tuning.mmla_row_pairs`` row pairs by ``Tuning.mmla_lane_pairs`` lane pairs (2 x 8: 16 accumulators,
2 code and 8 weight registers of NEON's 32). The rows come in pairs: the scheme needs an even number
of them (W4A16's two byte planes of a row always are a pair); :mod:`.dense` gives an odd W4A8 M to fold-k.
"""

from __future__ import annotations

from tvm import te
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.aarch64.intrinsics import usmmla_pair_intrinsic
from lpbq_tvm.kernels.tiled.decode import byte
from lpbq_tvm.kernels.tiled.integer import Problem, int8_tile
from lpbq_tvm.kernels.tiled.schedule import decode_by_block, epilogue_at, parallel, row_tile

__all__ = ["accumulate", "schedule"]


def accumulate(p: Problem) -> te.Tensor:
    if p.rows % 2:
        raise ValueError(f"the usmmla scheme multiplies row pairs: {p.rows} rows is odd")
    xq, wd = p.xq, int8_tile(p, by_lane=True)
    xp = te.compute((p.rows // 2, p.K // 8, 2, 8), lambda r, g, i, kk: xq[2 * r + i, 8 * g + kk], name="XqPairs")
    g, kk = te.reduce_axis((0, p.K // 8), "g"), te.reduce_axis((0, 8), "kk")
    pairs = te.compute(
        (p.rows // 2, p.tiles, p.lanes // 2, 2, 2),
        lambda r, t, c, i, j: te.sum(
            xp[r, g, i, kk].astype("int32") * byte(wd[t, g, 2 * c + j, kk // 4], kk % 4), axis=[g, kk]
        ),
        name="AccPairs",
    )
    return te.compute((p.rows, p.tiles, p.lanes), lambda m, t, n: pairs[m // 2, t, n // 2, m % 2, n % 2], name="Acc")


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, [decode the tile], lane-pair group, ro, g, g2, ri, ci, (i, j, kk) = usmmla): ri x ci
    accumulators, two k-steps per iteration."""
    pair_rows, *_, pair_bytes = sch.get_loops(sch.get_sblock("XqPairs"))
    sch.vectorize(pair_bytes)
    if p.rows // 2 >= p.tune.parallel_code_rows:
        sch.parallel(pair_rows)
    blk_wd, blk_acc = sch.get_sblock("Wd"), sch.get_sblock("AccPairs")
    r, t, c, i, j, g, kk = sch.get_loops(blk_acc)
    ro, ri = sch.split(r, [None, row_tile(p.rows // 2, p.tune.mmla_row_pairs)])
    width = next(w for w in (p.tune.mmla_lane_pairs, 4, 2) if (p.lanes // 2) % w == 0)
    group, ci = sch.split(c, [None, width])
    g, g2 = sch.split(g, [None, 2])  # K / 8 is even: B >= 16 divides K
    sch.reorder(t, group, ro, g, g2, ri, ci, i, j, kk)
    sch.compute_at(blk_wd, t)
    blk_copy = sch.get_sblock("Acc")
    sch.reverse_compute_at(blk_copy, t)
    epilogue_at(sch, t)
    _, words = decode_by_block(sch, blk_wd, p, by_lane=True)
    sch.unroll(words)  # the lane's two words; LLVM vectorizes along the lanes
    parallel(sch, t, None, p.target)
    sch.decompose_reduction(blk_acc, g)
    sch.tensorize(i, usmmla_pair_intrinsic())
    for loop in (g2, ri, ci):
        sch.unroll(loop)
