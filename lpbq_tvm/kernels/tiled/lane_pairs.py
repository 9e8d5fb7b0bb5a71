"""The lane-pair scheme of the uint8 kernel: two channels per byte, two dot products per load, one mask.

In the lane-pair layout (:func:`~lpbq_tvm.kernels.tiled.repack.repack_w4a8_lane_pairs`) byte j of a
dword holds ``u = q + 8`` of one k-position for channel i (low nibble) and channel i + 32 (high).
Per block b, 64-channel tile and dword lane i, with the same four activation codes ``a`` broadcast:
``R = Σ a · byte`` (raw bytes, ``u_lo + 16 u_hi``) and ``H = Σ a · (byte & 0xF0)`` (``16 u_hi``), then
``Pi = R − H`` for channel i and ``H / 16`` for channel i + 32, and ``Acc += k_b · (Pi − 8 Σ_b xq)``
as in the nibble scheme (:mod:`.nibble`). Per 16 bytes loaded: one ``and`` and two dot products for
32 multiply-accumulates, where the nibble scheme spends a shift more (the family's
``DotInstructions.lane_pair_intrinsic``). R starts at ``−136 Σ_b xq`` and H at ``−128 Σ_b xq``, so the
``− 8 Σ_b xq`` costs no step of its own. Exact in int32 up to ``MAX_B``: ``|R| <= B · 255 · (255 + 136)``.
It needs whole 64-channel tiles (``Problem.lanes == 64``) and blocks of two dwords or more (B >= 16).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import SBlock, Schedule

from lpbq_tvm.kernels.tiled.decode import k_value, lane_pair_bytes, unsigned_byte
from lpbq_tvm.kernels.tiled.integer import Problem
from lpbq_tvm.kernels.tiled.nibble import block_sums, per_block_loops
from lpbq_tvm.kernels.tiled.repack import LANES

__all__ = ["MAX_B", "accumulate", "schedule"]

PAIRS = LANES // 2  # dword lanes of a tile: channel i and i + 32 in each
MAX_B = (2**31 - 1) // (255 * (255 + 136))  # = 21540: a block's R fits int32 up to here


def accumulate(p: Problem) -> te.Tensor:
    if p.lanes != LANES or p.B > MAX_B:
        msg = f"lane pairs take whole 64-channel tiles and blocks up to {MAX_B}; got {p.lanes} lanes, B={p.B}"
        raise ValueError(msg)
    B, nb, xq, qw, kw = p.B, p.K // p.B, p.xq, p.qw, p.kw
    xqs = block_sums(p)
    g, h, jj = te.reduce_axis((0, B // 8), "g"), te.reduce_axis((0, 2), "h"), te.reduce_axis((0, 4), "jj")

    def term(m, t, b, s, i):
        word = lane_pair_bytes(qw[t, b * (B // 8) + g, h * PAIRS + i], s)
        return xq[m, b * B + 8 * g + 4 * h + jj].astype("int32") * unsigned_byte(word, jj)

    # R starts at −136 Σ_b xq and H at −128 Σ_b xq, so that R − H and H / 16 come
    # out less 8 Σ_b xq with no step of their own (:func:`_start_sums`)
    start = te.compute(
        (p.rows, nb, 2), lambda m, b, s: xqs[m, b] * te.if_then_else(s == 0, -136, -128), name="RH_start"
    )
    rh = te.compute(
        (p.rows, p.tiles, nb, 2, PAIRS),
        lambda m, t, b, s, i: te.sum(term(m, t, b, s, i), axis=[g, h, jj], init=start[m, b, s]),
        name="RH",
    )

    def pi(m, t, b, lane):  # Pi − 8 Σ_b xq
        i = lane % PAIRS
        return te.if_then_else(lane < PAIRS, rh[m, t, b, 0, i] - rh[m, t, b, 1, i], rh[m, t, b, 1, i] >> 4)

    bb = te.reduce_axis((0, nb), "bb")
    return te.compute(
        (p.rows, p.tiles, p.lanes),
        lambda m, t, lane: te.sum(pi(m, t, bb, lane) * k_value(kw, t, bb, "int32")(lane), axis=bb),
        name="Acc",
    )


def _start_sums(sch: Schedule) -> None:
    """The ``RH`` block's sums start at ``RH_start`` instead of 0. (A ``te.sum`` can name its start,
    ``init=``, but TVM 0.27's ``te.create_prim_func`` keeps only the tensor and starts at 0.) The
    block's reads stay as they are: tensorize matches the update's reads, which the start's region
    would join; ``RH_start`` is computed at the root, before any tile."""
    block_rv = sch.get_sblock("RH")
    block = sch.get(block_rv)
    start = next(buffer for buffer in sch.mod["main"].body.block.alloc_buffers if buffer.name == "RH_start")
    m, _, b, s, _ = (iv.var for iv in block.iter_vars[:5])
    init = tirx.BufferStore(block.init.buffer, tirx.BufferLoad(start, [m, b, s]), block.init.indices)
    started = SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, block.body, init,
                     block.alloc_buffers, block.match_buffers, block.annotations)  # fmt: skip
    sch.state.replace(sch.get_sref(block_rv), started, {block: started})


def schedule(sch: Schedule, p: Problem) -> None:
    """loops (t ∥, (mo,) b, [RH: g, h, (mi,) tile4, (s2, c4, j4) = one lane-pair intrinsic], Acc += k·(Pi − 8Σxq)),
    then the epilogue of the ``mi`` rows: ``mi x 16`` accumulators (R and H of 32 dword lanes)."""
    _start_sums(sch)
    blk_rh = sch.get_sblock("RH")
    inner = per_block_loops(sch, p, blk_rh, lane_halves=True)  # (m,) s, i, g, h, jj
    rows, (p_s, p_i, p_g, p_h, p_j) = inner[:-5], inner[-5:]
    p_tile, p_c = sch.split(p_i, [None, p.dot.lanes])
    sch.reorder(p_g, p_h, *rows, p_tile, p_s, p_c, p_j)
    sch.decompose_reduction(blk_rh, p_g)
    sch.tensorize(p_s, p.dot.lane_pair_intrinsic)
    if (p.B // 8) % 2 == 0:
        sch.unroll(sch.split(p_g, [None, 2])[1])
    for loop in (p_h, *rows, p_tile):
        sch.unroll(loop)
