"""The madd scheme of the x86 W4A16 kernel: pmaddwd on int16 codes and int16 ``q·k``, exactly.

With centred codes ``xc = xq − CODE_CENTER`` (an int16) and ``q·k`` (an int16, |q·k| <= 128) every
product is an integer of magnitude <= 2^22, so an int32 sum ``Q = Σ xc · q·k`` over a span of up
to ``INT32_SPAN`` k-positions stays within 2^30. pmaddwd multiplies int16 pairs and adds each pair
into int32 lanes (:func:`~lpbq_tvm.kernels.x86.intrinsics.madd_intrinsic`), so a MAC costs one
multiply as in the W4A8 kernels, with k folded into the decoded weights and no per-block step.
``acc = Σ Q + (CODE_CENTER − zx) · wsum``: for K <= ``W4A16_INT32_MAX_K`` (one span) it fits int32
and is formed modulo 2^32, above in float64 (integers below 2^53). The loops are the weight-only
GEMM's: ``q·k`` of a 64-channel tile (or of a span) decoded once to a local buffer of int16 pairs
for all rows.

The register tile is one row by all of the tile's lanes (8 ymm accumulators at 64 lanes): a row's
code pairs are then broadcast once per span (with 16-lane chunks inside a row group, LLVM hoisted
the rows' broadcasts out of the chunk loop and spilled them). Chosen where ``Tuning.madd_min_rows``
says so: where vector integer multiplies run on one pipe at half width, one pmaddwd per 16 MACs
beats two byte planes of pmaddubsw per 32.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.tiled.decode import k_value, top_nibble
from lpbq_tvm.kernels.tiled.integer import W4A16_INT32_MAX_K, code, integer_inputs, integer_output
from lpbq_tvm.kernels.tiled.repack import LANES
from lpbq_tvm.kernels.tiled.schedule import (
    decode_by_register,
    finish,
    parallel,
    schedule_codes,
    tensorize_or_vectorize,
    tile_lanes,
)
from lpbq_tvm.kernels.x86.intrinsics import madd_intrinsic
from lpbq_tvm.kernels.x86.isa import BLOCK_DOT_INSTRUCTIONS, dot_instructions, register_dwords
from lpbq_tvm.kernels.x86.tuning import tuning

__all__ = ["w4a16_madd_dense"]

INT32_SPAN = 256  # k-positions per int32 sum: 256 · 2^15 · 128 = 2^30
CODE_CENTER = 32768  # subtracted from uint16 codes: xq − 32768 is an int16


def w4a16_madd_dense(M, N, K, B, with_bias, target) -> tirx.PrimFunc:
    """Scheduled W4A16 kernel ``main(x, qw, kw, wsum, s, sx, zx, [bias], y)`` of the madd scheme (module docstring)."""
    instructions = dot_instructions(target)  # the pmaddwd of its instruction set (VNNI implies AVX512BW)
    instructions = "avx512bw" if instructions == "vnni" else instructions
    n = BLOCK_DOT_INSTRUCTIONS[instructions][2] if instructions else 16  # lanes per pmaddwd
    x, qw, kw, wsum, s, sx, zx, bias = integer_inputs(M, N, K, B, with_bias)
    width = tile_lanes(N, n)
    center = tirx.const(float(CODE_CENTER), "float32")
    xc = te.compute(
        (M, K), lambda m, i: (code(x[m, i], sx[0], zx[0], 65535) - center).astype("int32").astype("int16"), name="xc"
    )
    acc, wide = _accumulate(xc, qw, kw, wsum, N, K, B, zx[0], width)

    def exact_acc(m, n):
        total = acc[m, n // LANES, n % LANES]
        return (total.astype("int32") if wide == "uint32" else total).astype("float32")

    y = integer_output(M, N, exact_acc, lambda m: sx[0], s, bias)
    sch = Schedule(te.create_prim_func([t for t in (x, qw, kw, wsum, s, sx, zx, bias, y) if t is not None]))
    schedule_codes(sch, "xc", tuning(target).parallel_code_rows)
    _schedule(sch, K, width, n, instructions, target)
    return finish(sch, sch.get_sblock("y"))


def _accumulate(xc, qw, kw, wsum, N, K, B, zx, width) -> tuple[te.Tensor, str]:
    """``Acc`` (uint32 modulo 2^32 up to ``W4A16_INT32_MAX_K``, else float64) and its dtype."""
    nt = -(-N // LANES)
    M = int(xc.shape[0])
    span = max(d for d in range(8, INT32_SPAN + 1, 8) if K % d == 0)
    spans = K // span

    def pair(t, p, lane):
        """``q·k`` at k-positions 2p and 2p + 1 as the low and high int16 of a dword. In the W4A8 layout
        k-position 8g + 4hh + j is nibble 2j + hh of dword g; xor 0x8 per nibble gives two's complement."""
        word = qw[t, p // 4, lane] ^ tirx.const(0x88888888, "uint32")
        r = 2 * (p % 4)  # the pair's k-positions in the dword: r and r + 1
        low, high = (2 * (i % 4) + i // 4 for i in (r, r + 1))
        k = k_value(kw, t, (2 * p) // B, "int32")(lane)
        low_qk = (top_nibble(word, low) >> 28) * k & tirx.const(0xFFFF, "int32")
        return low_qk | (top_nibble(word, high) >> 12) * k  # (q · 2^16) · k: the high half

    w = te.compute((nt, K // 2, width), pair, name="W")
    r, j = te.reduce_axis((0, span // 2), "r"), te.reduce_axis((0, 2), "j")
    q = te.compute(
        (M, nt, spans, width),
        lambda m, t, g, lane: te.sum(
            xc[m, g * span + 2 * r + j].astype("int32")
            * (w[t, g * (span // 2) + r, lane] >> (j * 16)).astype("int16").astype("int32"),
            axis=[r, j],
        ),
        name="Q",
    )
    wide = "uint32" if K <= W4A16_INT32_MAX_K else "float64"  # modulo 2^32 where the exact sum fits int32
    shift_c = (CODE_CENTER - zx).astype(wide)  # (int32 -> uint32 keeps it modulo 2^32)
    offset = te.compute(  # (CODE_CENTER − zx) · wsum of the tile's channels, once per tile
        (nt, width), lambda t, lane: wsum[tirx.min(t * LANES + lane, N - 1)].astype(wide) * shift_c, name="offset"
    )
    g = te.reduce_axis((0, spans), "g")
    acc = te.compute(
        (M, nt, width),
        lambda m, t, lane: te.sum(
            q[m, t, g, lane].astype(wide) + tirx.Select(g == 0, offset[t, lane], tirx.const(0, wide)), axis=g
        ),
        name="Acc",
    )
    return acc, wide


def _schedule(sch: Schedule, K: int, width: int, n: int, instructions: str | None, target) -> None:
    """The whole tile's ``q·k`` decoded once (up to ``Tuning.whole_tile_bytes``) with rows inside, else
    a span at a time with rows inside the span; one row by the tile's lanes per register tile."""
    blk_w, blk_q, blk_offset, blk_acc, blk_y = (sch.get_sblock(name) for name in ("W", "Q", "offset", "Acc", "y"))
    m, t, lane, span_loop = sch.get_loops(blk_acc)
    whole = K // 2 * width * 4 <= tuning(target).whole_tile_bytes
    outer = (t, m, span_loop) if whole else (t, span_loop, m)
    sch.reorder(*outer, lane)
    sch.compute_at(blk_q, outer[-1], preserve_unit_loops=True)  # loops (m, t, g, lane, r, j)
    q_lane, q_r, q_j = sch.get_loops(blk_q)[-3:]
    q_chunk, q_c = sch.split(q_lane, [None, n])
    sch.reorder(q_r, q_chunk, q_c, q_j)
    sch.compute_at(blk_w, t if whole else span_loop)
    sch.compute_at(blk_offset, t)
    sch.reverse_compute_at(blk_y, m if whole else t)
    decode_by_register(sch, blk_w, 4, register_dwords(target))  # 4 int16 pairs per dword
    for loop in (sch.get_loops(blk_offset)[-1], lane, sch.get_loops(blk_y)[-1]):
        sch.vectorize(loop)
    parallel(sch, t, m if whole else None, target)
    sch.decompose_reduction(blk_acc, span_loop)
    intrinsic = madd_intrinsic(instructions) if instructions else None
    tensorize_or_vectorize(sch, blk_q, q_c, q_j, q_r, intrinsic, [q_chunk])
