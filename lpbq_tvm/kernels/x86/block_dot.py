"""The block-dot scheme of the x86 uint8 kernel: pmaddubsw sums per block, scaled by k as they widen.

``Acc = Σ_b k_b · Σ_j xq · q`` with signed ``q = u − 8`` (no ``Σ xq`` correction), one reduction over
(g, jj) tensorized by the block-dot intrinsic (:func:`~lpbq_tvm.kernels.x86.intrinsics.block_dot_intrinsic`)
in steps of up to ``BLOCK_DOT_GROUPS`` dwords. Taken with pmaddubsw (AVX512BW on zmm, AVX2 on ymm)
and no VNNI. From ``Tuning.decoded_min_rows`` rows the tile's signed bytes are decoded once into a
local buffer (``Wq``, K · 64 bytes) for all row groups; below, in registers per row group, and a
kernel of one row group (a GEMV, which streams the nibbles once) prefetches them.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.tiled.decode import byte, k_value, nibbles, signed_bytes
from lpbq_tvm.kernels.tiled.integer import Problem
from lpbq_tvm.kernels.tiled.schedule import epilogue_at, parallel, row_tile
from lpbq_tvm.kernels.x86.intrinsics import block_dot_groups, block_dot_intrinsic
from lpbq_tvm.kernels.x86.isa import BLOCK_DOT_INSTRUCTIONS

__all__ = ["accumulate", "schedule"]


def _decoded(p: Problem) -> bool:
    return p.rows >= p.tune.decoded_min_rows


def accumulate(p: Problem) -> te.Tensor:
    B, K, xq, qw, kw = p.B, p.K, p.xq, p.qw, p.kw
    kb = te.compute((p.tiles, K // B, p.lanes), lambda t, b, lane: k_value(kw, t, b, "uint8")(lane), name="kb")
    groups = block_dot_groups(B)
    go, gi = te.reduce_axis((0, K // (8 * groups)), "go"), te.reduce_axis((0, groups), "gi")
    jj = te.reduce_axis((0, 4), "jj")
    g = go * groups + gi
    decoded = _decoded(p)
    if decoded:  # the tile's signed bytes, once for all row groups
        wq = te.compute(
            (p.tiles, K // 8, 2, p.lanes),
            lambda t, g, hh, lane: tirx.Select(
                hh == 0, signed_bytes(nibbles(qw[t, g, lane], 0)), signed_bytes(nibbles(qw[t, g, lane], 1))
            ).astype("int32"),
            name="Wq",
        )

    def signed_q(t, lane, hh):  # q at k-position 8g + 4hh + jj
        if decoded:
            return byte(wq[t, g, hh, lane], jj)
        return byte(nibbles(qw[t, g, lane], hh).astype("int32"), jj) - 8

    def signed_term(m, t, lane, hh):
        return xq[m, 8 * g + 4 * hh + jj].astype("int32") * signed_q(t, lane, hh)

    return te.compute(
        (p.rows, p.tiles, p.lanes),
        lambda m, t, lane: te.sum(
            (signed_term(m, t, lane, 0) + signed_term(m, t, lane, 1)) * kb[t, (8 * g) // B, lane].astype("int32"),
            axis=[go, gi, jj],
        ),
        name="Acc",
    )


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, [kb, (Wq)], mo, [chunk, go | go, chunk], mi, (c, gi, jj) = one block-dot intrinsic),
    then the epilogue of the ``mi`` rows.

    ``mi`` rows share each weight load; their int32 accumulators and int16 partial sums stay in
    registers. With one row group (GEMV) the channel chunks are inside the K loop, so the streamed
    weights are read contiguously once (and prefetched); with several, each chunk runs over all of K
    (its accumulators never leave registers) and the tile's weights are re-read from cache.
    """
    M, decoded = p.rows, _decoded(p)
    width = BLOCK_DOT_INSTRUCTIONS[p.dot.name][2]
    blk_acc = sch.get_sblock("Acc")
    m, t, lane, go, gi, jj = sch.get_loops(blk_acc)
    mi = row_tile(M, p.tune.nibble_rows, p.planes)
    mo, m_in = sch.split(m, [None, mi])
    chunk, c = sch.split(lane, [None, width])
    if mi < M:
        sch.reorder(t, mo, chunk, go, m_in, c, gi, jj)
    else:
        sch.reorder(t, mo, go, chunk, m_in, c, gi, jj)
    for name in ("kb", "Wq") if decoded else ("kb",):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, t)
        sch.vectorize(sch.get_loops(blk)[-1])
    epilogue_at(sch, mo)
    parallel(sch, t, mo, p.target)
    sch.decompose_reduction(blk_acc, go)
    streamed = not decoded and mi == M
    intrinsic = block_dot_intrinsic(p.dot.name, block_dot_groups(p.B), decoded, p.tune.prefetch_rows * streamed)
    sch.tensorize(c, intrinsic)
    sch.unroll(m_in)
