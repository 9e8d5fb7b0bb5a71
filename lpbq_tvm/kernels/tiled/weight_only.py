"""The CPU families' weight-only kernel: ``y[m, n] = s[n] · Σ_i x[m, i] · float(q[n, i] · k[n, i // B]) (+ bias[n])``.

float32 activations and accumulation; it differs from exact arithmetic by float32 rounding only
(reassociation: per block ``P_b = Σ x · q``, then ``Σ_b P_b · k_b``; codes are decoded signed, so
there is no offset cancellation and all-zero codes give exactly 0). It reads the weight-only layout
of :mod:`~lpbq_tvm.kernels.tiled.repack` and has two schedules, which the family chooses by M:

* :func:`weight_only_gemv`: nibbles decoded in registers (by the family's LUT intrinsic, e.g. x86's
  vpermps, or as plain vector code), the decode shared by row groups of up to ``lut_rows`` rows;
* :func:`weight_only_gemm`: ``float(q·k)`` decoded to a local buffer — the whole 64-channel tile up
  to ``whole_tile_bytes``, else a panel of whole blocks up to ``panel_k`` k-positions at a time —
  one register of dwords at a time, then ``mi x width`` register tiles.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.tiled.decode import k_value, signed_nibble, top_nibble
from lpbq_tvm.kernels.tiled.repack import LANES, check_shape
from lpbq_tvm.kernels.tiled.schedule import decode_by_register, finish, micro_rows, parallel, tile_lanes

__all__ = ["weight_only_gemm", "weight_only_gemv"]


def _inputs(M, N, K, B, with_bias):
    nt, nbh = -(-N // LANES), -(-(K // B) // 2)
    x = te.placeholder((M, K), "float32", "x")
    qw = te.placeholder((nt, K // 8, LANES), "uint32", "qw")
    kw = te.placeholder((nt, nbh, LANES), "uint8", "kw")
    s = te.placeholder((N,), "float32", "s")
    bias = te.placeholder((N,), "float32", "bias") if with_bias else None
    return nt, x, qw, kw, s, bias


def _output(M, N, acc, s, bias):
    if bias is None:
        return te.compute((M, N), lambda m, n: acc[m, n // LANES, n % LANES] * s[n], name="y")
    return te.compute((M, N), lambda m, n: acc[m, n // LANES, n % LANES] * s[n] + bias[n], name="y")


def _prim_func(x, qw, kw, s, bias, y) -> Schedule:
    return Schedule(te.create_prim_func([t for t in (x, qw, kw, s, bias, y) if t is not None]))


def weight_only_gemv(M, N, K, B, with_bias, *, chunk: int, lut_intrinsic: str | None, lut_rows: int) -> tirx.PrimFunc:
    """Per (64-channel tile, block b): ``P = Σ x · q`` (float, q decoded in registers), ``Acc += P · k``.
    ``chunk``: channels per LUT intrinsic call (or per vectorized decode without one); needs B > 8."""
    check_shape(N, K, B)
    nt, x, qw, kw, s, bias = _inputs(M, N, K, B, with_bias)
    nb, width = K // B, tile_lanes(N, chunk)
    gg = te.reduce_axis((0, B // 8), "gg")
    hh = te.reduce_axis((0, 8), "hh")
    p = te.compute(
        (M, nt, nb, width),
        lambda m, t, b, lane: te.sum(
            x[m, b * B + 8 * gg + hh] * signed_nibble(qw[t, b * (B // 8) + gg, lane], hh).astype("float32"),
            axis=[gg, hh],
        ),
        name="P",
    )
    bb = te.reduce_axis((0, nb), "bb")
    acc = te.compute(
        (M, nt, width),
        lambda m, t, lane: te.sum(p[m, t, bb, lane] * k_value(kw, t, bb, "float32")(lane), axis=bb),
        name="Acc",
    )
    sch = _prim_func(x, qw, kw, s, bias, _output(M, N, acc, s, bias))

    blk_p, blk_acc, blk_y = sch.get_sblock("P"), sch.get_sblock("Acc"), sch.get_sblock("y")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = M if lut_rows >= M else next(d for d in (lut_rows, 4, 3, 2, 1) if M % d == 0)
    if mi < M:  # row groups of mi rows: the nibble decode is redone per group, shared within it
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, b, mo, m_in, lane)
        sch.compute_at(blk_p, mo)
        depth = 3
    else:
        sch.reorder(t, b, m, lane)
        sch.compute_at(blk_p, b)
        depth = 2
    sch.reverse_compute_at(blk_y, t)
    inner = sch.get_loops(blk_p)[depth:]  # (m,) lane, gg, hh — compute_at drops a unit m loop
    rows, (p_lane, p_g, p_h) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, chunk])
    if lut_intrinsic is not None:  # (c16, h8) = one LUT intrinsic; rows x 4 tiles FMA chains, decode shared by the rows
        sch.reorder(p_g, *rows, p_tile, p_c, p_h)
    else:
        sch.reorder(p_g, p_h, *rows, p_tile, p_c)
        sch.vectorize(p_c)
        sch.unroll(p_h)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(blk_y)[-1])
    sch.parallel(t)
    sch.decompose_reduction(blk_p, p_g)
    if lut_intrinsic is not None:
        sch.tensorize(p_c, lut_intrinsic)
    for loop in (*rows, p_tile):
        sch.unroll(loop)
    sch.decompose_reduction(blk_acc, b)
    return finish(sch, blk_y)


def _panel(K: int, B: int, panel_k: int) -> int:
    """k positions per decode step of a tile too large to decode whole: the most whole blocks within
    ``panel_k`` that divide K, at least one block."""
    blocks = K // B
    return B * max(d for d in range(1, max(panel_k // B, 1) + 1) if blocks % d == 0)


def weight_only_gemm(
    M, N, K, B, with_bias, *, width: int, register_lanes: int, whole_tile_bytes: int, panel_k: int, target, k_unroll=1
) -> tirx.PrimFunc:
    """Decode ``q·k`` of a 64-channel tile to local floats, then (mi x ``width``) register tiles.

    Whole tile (up to ``whole_tile_bytes``): decoded once, row groups the outer loop (loops t, mo,
    chunk, b, r, mi, lane: the accumulators stay in registers over all of K, and each group's output
    is written right away). Above, one panel of whole blocks at a time (loops t, p, chunk, mo, r, mi,
    lane), accumulating all M rows of the tile in a local [M, 64] buffer. ``register_lanes``: floats
    per vector register (the decode's unit); ``target``: its cores (parallel loops); ``k_unroll``:
    k-steps unrolled around each register tile (a divisor of B)."""
    check_shape(N, K, B)
    nt, x, qw, kw, s, bias = _inputs(M, N, K, B, with_bias)
    tile = tile_lanes(N, width)

    def weight(t, i, lane):  # q · k: exact (|q·k| <= 128)
        return top_nibble(qw[t, i // 8, lane], i % 8).astype("float32") * (
            k_value(kw, t, i // B, "float32")(lane) * tirx.const(2.0**-28, "float32")
        )

    w = te.compute((nt, K, tile), weight, name="W")
    i = te.reduce_axis((0, K), "i")
    acc = te.compute((M, nt, tile), lambda m, t, lane: te.sum(x[m, i] * w[t, i, lane], axis=i), name="Acc")
    sch = _prim_func(x, qw, kw, s, bias, _output(M, N, acc, s, bias))

    blk_w, blk_acc, blk_y = sch.get_sblock("W"), sch.get_sblock("Acc"), sch.get_sblock("y")
    m, t, lane, i = sch.get_loops(blk_acc)
    whole = K * tile * 4 <= whole_tile_bytes
    b, r = sch.split(i, [None, B if whole else _panel(K, B, panel_k)])
    mo, mi = sch.split(m, [None, micro_rows(M)])
    chunk, lane = sch.split(lane, [None, width])
    if whole:
        sch.reorder(t, mo, chunk, b, r, mi, lane)
        sch.compute_at(blk_w, t)
        sch.reverse_compute_at(blk_y, mo)
    else:
        sch.reorder(t, b, chunk, mo, r, mi, lane)
        sch.compute_at(blk_w, b)
        sch.reverse_compute_at(blk_y, t)
    decode_by_register(sch, blk_w, 8, register_lanes)  # 8 nibbles of floats per dword
    if k_unroll > 1:  # k-steps unrolled around the register tile (LLVM then loads x as vectors)
        r_outer, r_inner = sch.split(r, [None, k_unroll])
        sch.reorder(r_outer, r_inner, mi, lane)
        sch.unroll(r_inner)
    sch.unroll(mi)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(blk_y)[-1])
    parallel(sch, t, mo if whole else None, target)
    sch.decompose_reduction(blk_acc, b)
    return finish(sch, blk_y)
