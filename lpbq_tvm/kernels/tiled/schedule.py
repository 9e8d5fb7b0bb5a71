"""Schedule steps the tiled-layout kernels share: tiles and row groups, parallel loops, decodes, the output block."""

from __future__ import annotations

import math

from tvm import tirx
from tvm.s_tir import Schedule

from lpbq_tvm.kernels.interface import FUSABLE_OUTPUT
from lpbq_tvm.kernels.tiled.repack import LANES

__all__ = [
    "decode_by_block",
    "decode_by_register",
    "epilogue_at",
    "finish",
    "micro_rows",
    "parallel",
    "row_tile",
    "schedule_codes",
    "tensorize_or_vectorize",
    "tile_lanes",
]


def tile_lanes(N: int, multiple: int) -> int:
    """Lanes a kernel computes per channel tile: all 64, or with one tile only the first N rounded up to
    ``multiple`` (the vector width), so that a layer of 32 channels does not compute 32 padded ones."""
    return min(LANES, -(-N // multiple) * multiple)


def finish(sch: Schedule, output) -> tirx.PrimFunc:
    """The scheduled function, out-elementwise-fusable (``op_pattern = 4``) with its ``output`` block
    marked :data:`FUSABLE_OUTPUT`: the elementwise ops after it join its function and are inlined into
    that block (``schedule_rules.KernelEpilogue``)."""
    sch.annotate(output, FUSABLE_OUTPUT, 1)
    return sch.mod["main"].with_attrs({"op_pattern": 4, "tirx.is_scheduled": True})


def parallel(sch: Schedule, tiles, row_groups, target) -> None:
    """Parallel over the channel tiles; or, with fewer tiles than the target's cores, over parts of the
    row groups within each tile (``row_groups``: a loop directly inside the tile loop, or None where
    there is none): a layer of one tile (up to 64 channels) would otherwise run on one core
    however many rows it has. The parts are at most 4 per core, each a serial loop over its groups,
    so the local buffers are allocated once per part rather than once per row group."""
    cores = int(target.attrs.get("num-cores", 1))
    if row_groups is None or int(sch.get(tiles).extent) >= cores:
        sch.parallel(tiles)
        return
    groups = int(sch.get(row_groups).extent)
    parts = max(d for d in range(1, 4 * cores + 1) if groups % d == 0)
    if parts < cores:
        sch.parallel(tiles)
    else:
        sch.parallel(sch.split(row_groups, [parts, None])[0])


def micro_rows(M: int) -> int:
    """Rows of the weight-only GEMM's register tile: a divisor of M if one is handy, else 4 (tail predicated)."""
    if M <= 6:
        return M
    for d in (4, 6, 5, 3):
        if M % d == 0:
            return d
    return 4


def row_tile(M: int, rows: int, planes: int = 1) -> int:
    """Rows per register tile of an integer kernel: M itself up to ``rows``, else a divisor of M
    (tensorize cannot take a predicate) that is a multiple of ``planes``."""
    if rows >= M:
        return M
    return next(d for d in (rows, 4, 6, 5, 3, 2, 1) if M % d == 0 and d % planes == 0)


def epilogue_at(sch: Schedule, loop) -> None:
    """``y = float(Acc − zx·wsum) · sx · s (+ bias)`` per iteration of ``loop`` (a channel tile or a row
    group), 64 lanes vectorized."""
    blk_y = sch.get_sblock("y")
    sch.reverse_compute_at(blk_y, loop)
    sch.vectorize(sch.get_loops(blk_y)[-1])


def tensorize_or_vectorize(sch: Schedule, blk, c, j, g, intrinsic: str | None, unroll) -> None:
    """Decompose the reduction at g, then tensorize (c, j) or vectorize c; unroll the register tile."""
    if intrinsic is None:
        sch.reorder(j, c)
        sch.vectorize(c)
        sch.unroll(j)
    sch.decompose_reduction(blk, g)
    if intrinsic is not None:
        sch.tensorize(c, intrinsic)
    for loop in unroll:
        sch.unroll(loop)


def decode_by_register(sch: Schedule, block, per_dword: int, register_lanes: int) -> None:
    """A tile decode's last two loops (values, lanes) as (dwords, register chunks, the ``per_dword``
    values of a dword unrolled, one register of lanes vectorized): each loaded register of dwords
    becomes ``per_dword`` registers of values with constant shifts, and only those are live (decoding
    all 64 lanes of a value at once, LLVM keeps 64 decoded registers live and spills them)."""
    values, lane = sch.get_loops(block)[-2:]
    dwords, value = sch.split(values, [None, per_dword])
    chunk, lane = sch.split(lane, [None, register_lanes])
    sch.reorder(dwords, chunk, value, lane)
    sch.unroll(value)
    sch.vectorize(lane)


def decode_by_block(sch: Schedule, block, p, by_lane: bool, chunk_lanes: int = 16) -> tuple:
    """The decoded int8 tile (:func:`~lpbq_tvm.kernels.tiled.integer.int8_tile`, computed at a channel
    tile) decoded block by block, up to ``chunk_lanes`` lanes at a time, with the block's ``k`` nibbles
    read once into a buffer of their own: its loops (g, then lanes and half, or half and lanes with
    ``by_lane``) become (block, lane chunk, k-step, the other two in their order). The buffer is small
    enough for the stack, which no store to the tile can alias, so LLVM computes each lane's ``k`` and
    offset once per block and chunk instead of at every k-step (where it reloaded them: the tile's stores
    might have changed the weights). Returns the two innermost loops in their order."""
    g, first, second = sch.get_loops(block)[-3:]
    step_block, step = sch.split(g, [None, p.B // 8])
    chunk, lane = sch.split(first if by_lane else second, [None, math.gcd(p.lanes, chunk_lanes)])
    inner = (lane, second) if by_lane else (first, lane)
    sch.reorder(step_block, chunk, step, *inner)
    reads = [str(region.source.name) for region in sch.get(block).reads]
    sch.compute_at(sch.cache_read(block, reads.index(p.kw.name), "global"), chunk)
    return inner


def schedule_codes(sch: Schedule, name: str, parallel_rows: int) -> None:
    """The activation-code stage: one flat loop over rows and k-positions, which LLVM vectorizes along
    the codes (TVM's VectorizeLoop scalarizes ``nearbyint``; as two loops, LLVM unrolled a short row
    and vectorized across rows, storing the codes one by one). From ``parallel_rows`` rows it runs
    parallel, in parts of whole rows."""
    rows, codes = sch.get_loops(sch.get_sblock(name))
    extent = int(sch.get(rows).extent)
    flat = sch.fuse(rows, codes)
    if extent >= parallel_rows:
        group = next(d for d in (8, 4, 2, 1) if extent % d == 0)  # rows per part
        sch.parallel(sch.split(flat, [extent // group, None])[0])
