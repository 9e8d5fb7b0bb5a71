"""Schedule rules for the CPU: what TVM 0.27 leaves as plain loop nests, register-tiled and vectorised.

TVM 0.27 lowers ``nn.conv2d`` / ``nn.conv1d`` / ``matmul`` (fp32, and the generic LPBQ kernels) to
plain loop nests: the reduction innermost, nothing vectorised or parallel; dlight's CPU rules cover
GEMV and reductions only. The CPU pipeline (:mod:`lpbq_tvm.targets.pipeline`) applies these rules
after ``FuseTIR``, in this order, then dlight's CPU ``Reduction`` rule to the reductions left:

* :class:`KernelEpilogue`, for a scheduled kernel (block :data:`FUSABLE_OUTPUT`) fused with the
  elementwise ops after it: the ops are computed in the kernel's output block as each tile is
  written, so they make no pass of their own over the output. The kernel's schedule is kept.
* :class:`RegisterTiled`, for a PrimFunc with one reduction block that is a convolution (NCHW /
  NCW: ``n, f, [y,] x`` spatial, ``rc, [ry,] rx`` reduction; NHWC: ``n, y, x, f`` and
  ``ry, rx, rc``) or a matmul (spatial iterators, then one reduction): the block accumulates a
  register tile of ``ft`` output channels (NCHW), pixels of a row (NHWC) or rows (matmul) x ``v``
  elements of the innermost spatial axis longer than 1. ``ft`` and ``v`` divide their axes (so the
  tile never straddles a row: the write-back covers exactly the tile) and are sized to the
  target's :class:`RegisterFile` (:func:`register_tile`). Outer loops are fused and parallel (from
  ``MIN_PARALLEL`` iterations), then ``reduction..., ft, v`` with ``ft`` unrolled and ``v``
  vectorised, then one write-back. A matmul runs strips of ``v`` output columns outside its row
  tiles, each strip of a large weight copied to a contiguous buffer first (:func:`_strips_outer`).
* :class:`Elementwise`, for a PrimFunc without reductions, or whose one reduction is its output
  (pooling after an activation): producers inlined into consumers (the reduction's own inputs
  stay stages), each spatial block parallel over its outer loops and vectorised over its
  innermost, the reduction parallel over the axes it keeps.
* :class:`LaneReduction`, for row reductions (softmax, norms: reductions along the innermost axis
  and elementwise blocks over the same rows, kept-dims norms included): dlight's schedule (rows
  parallel, every block per row, elementwise blocks vectorised), with each reduction first split
  into one partial result per vector lane (``rfactor``) where the row is a multiple of the lanes.

Other blocks of a :class:`RegisterTiled` function (padding at stride 1, weight expansion from packed
codes, activation codes) keep their own stage, parallel and vectorised; a strided conv reads its
padding in place, and an unpadded one its input (:func:`_inline_padding`). An fp32 epilogue (bias,
activation) is computed inline as the register tile is written back, with no pass of its own over
the output; an epilogue marked :data:`SEPARATE_ROUNDING` (a generic LPBQ kernel's) keeps one stage
per operator, outside the write-back: a multiply and an add in one expression become one FMA under
LLVM, which the LPBQ integer epilogue must not (docs/design.md §3). Integer accumulation (W4A8 /
W4A16) is scheduled the same way; integer sums do not depend on their order.

Why each rule looks as it does is recorded in ``docs/internals/cpu-pipeline.md``; re-measure a
change with ``benchmarks/bench_pipeline.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import get_extent
from tvm.target.codegen import llvm_get_vector_width

from lpbq_tvm.kernels.interface import FUSABLE_OUTPUT, SEPARATE_ROUNDING

__all__ = [
    "Elementwise",
    "Fallible",
    "KernelEpilogue",
    "LaneReduction",
    "RegisterFile",
    "RegisterTiled",
    "register_tile",
]

logger = logging.getLogger(__name__)

_REDUCE = 2  # tirx.IterVar.CommReduce


@dataclass(frozen=True)
class RegisterFile:
    """The vector registers a register tile may fill: ``lanes`` float32 per register, ``registers`` in
    all, ``spare`` of them kept free for the operands streamed through the tile."""

    lanes: int
    registers: int
    spare: int

    @property
    def accumulators(self) -> int:
        return self.registers - self.spare


def _largest_divisor(extent: int, choices: tuple[int, ...]) -> int:
    return next((c for c in choices if extent % c == 0), 1)


def _vector_lanes(extent: int) -> int:
    """The largest divisor of ``extent`` up to 16 (14 for 196, 7 for 49): a split that does not divide
    leaves a predicate in the loop, and TVM then does not vectorise it at all."""
    return _largest_divisor(extent, tuple(range(16, 1, -1)))


class RegisterTiled(dlight.ScheduleRule):
    """A register-tiled reduction: direct NCHW / NCW / NHWC convolution or matmul (see the module docstring),
    its tiles sized to ``registers``."""

    def __init__(self, registers: RegisterFile) -> None:
        self.registers = registers

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if (opened := _open(func, target)) is None:
            return None
        sch, blocks = opened
        reducing = [block for block in blocks if _reduces(sch, block)]
        if len(reducing) != 1:
            return None
        main = reducing[0]
        kind = _kind(sch, main)
        if kind is None:
            return None
        # The accumulator tile in "global" scope: TVM 0.27 puts a "local" buffer on the heap (one
        # TVMBackendAllocWorkspace call per tile, in the parallel loop), a "global" one below 1 KiB on
        # the stack, where LLVM keeps it in registers.
        local = sch.cache_write(main, 0, "global")
        loops = sch.get_loops(main)
        reductions = sum(int(i.iter_type) == _REDUCE for i in sch.get(main).iter_vars)
        spatial, reduction = loops[: len(loops) - reductions], loops[len(loops) - reductions :]
        extents = [int(sch.get(loop).extent) for loop in spatial]
        # The tile axis: output channels of an NCHW conv, x of an NHWC conv, rows of a matmul. The vector
        # axis: the innermost spatial axis longer than 1 (a [N, C, L, 1] conv vectorises over L).
        tile = 1 if kind == "conv" else len(spatial) - 2
        if kind == "conv" and len(spatial) == 4 and _channel_axis(sch, main) == 3:  # NHWC: rows are pixels of x
            tile = 2
        vector = max((i for i, e in enumerate(extents) if e > 1), default=len(extents) - 1)
        if vector <= tile or extents[vector] == 1:  # one value per row: a row reduction (LaneReduction's), not
            # a matmul of one output, whose sum would be one serial, latency-bound add chain
            return None
        work = _iterations(sch, main)
        ft, v = register_tile(extents[tile], extents[vector], self.registers)
        fo, fi = sch.split(spatial[tile], [None, ft])
        xo, xi = sch.split(spatial[vector], [None, v])
        outer = [loop for i, loop in enumerate(spatial) if i not in (tile, vector)]
        before, after = outer[:tile], outer[tile:]
        if kind == "matmul":
            _strips_outer(sch, main, local, before, fo, xo, reduction, fi, xi, extents[tile] > ft, work)
        else:
            sch.reorder(*before, fo, *after, xo, *reduction, fi, xi)
            sch.reverse_compute_at(local, xo)
            _parallel(sch, sch.fuse(*before, fo, *after), work)
        sch.unroll(fi)
        if v > 1:
            sch.vectorize(xi)
            sch.vectorize(sch.get_loops(local)[-1])
        sch.decompose_reduction(main, reduction[0])
        position = next(i for i, block in enumerate(blocks) if sch.get(block).same_as(sch.get(main)))
        others = [sch.get(block) for i, block in enumerate(blocks) if i != position]
        names = [stmt.name_hint for stmt in others]
        if not any(SEPARATE_ROUNDING in stmt.annotations for stmt in others):
            _inline_epilogue(sch, blocks[position + 1 :])
        if kind == "conv":
            _inline_padding(sch, main)
        for name in names:
            try:
                block = sch.get_sblock(name)
            except s_tir.ScheduleError:  # inlined
                continue
            _parallel_elementwise(sch, block)
        return sch


_IF_THEN_ELSE = tvm.ir.Op.get("prim.if_then_else")


def _inline_padding(sch: s_tir.Schedule, conv) -> None:
    """A conv reads its input in place instead of from a padded copy where that is cheaper: always
    when the copy pads nothing (TOPI copies the input of an unpadded conv too), and at a stride, with
    the zero padding as ``if_then_else`` in the loads. There the copy is one more pass over an input
    four times the size of the output (stride 2), a cost that shows once the input no longer sits in
    cache. At stride 1 the padded copy stays: guarded loads in every tap cost more than the copy."""
    stmt = sch.get(conv)
    for producer in sch.get_producers(conv):
        value = getattr(sch.get(producer).body, "value", None)
        padding = isinstance(value, tvm.ir.Call) and value.op.same_as(_IF_THEN_ELSE)
        if not padding and not isinstance(value, tvm.ir.TensorLoad):
            continue
        copy = sch.get(producer).writes[0].source
        reads = [r.min for region in stmt.reads if region.source.same_as(copy) for r in region.region]
        if not padding or any(_has_stride(index) for index in reads):
            sch.compute_inline(producer)


def _has_stride(index) -> bool:
    """Whether ``index`` has a term ``i * s`` with a constant s > 1 (a strided window: ``y * 2 + ry``)."""
    if isinstance(index, tirx.expr.Mul):
        return any(isinstance(x, tirx.expr.IntImm) and x.value > 1 for x in (index.a, index.b))
    if isinstance(index, (tirx.expr.Add, tirx.expr.Sub)):
        return _has_stride(index.a) or _has_stride(index.b)
    return False


def _inline_epilogue(sch: s_tir.Schedule, epilogue) -> None:
    """The elementwise chain after the reduction (bias, activation, ...) computed inline into its
    last block (a GELU after a matmul is nine of them), and that block into the tile's write-back: the
    epilogue runs on each register tile as it is stored, not as one more pass over the output. Not
    for an epilogue marked :data:`SEPARATE_ROUNDING` (the caller checks), whose roundings must stay
    separate (a multiply and an add inlined into one expression become one FMA)."""
    outputs = {sch.get(block) for block in sch.get_output_blocks(sch.get_sblock("root"))}
    # taken before inlining: inlining a producer rewrites its consumers, whose statements then no
    # longer compare equal to those in `outputs`
    last = [block for block in epilogue if sch.get(block) in outputs]
    for block in epilogue:
        if sch.get(block) not in outputs:
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:
                continue
    for block in last:
        shape = sch.get(block).writes[0].source.shape
        produced = [sch.get(producer).writes[0].source.shape for producer in sch.get_producers(block)]
        if not all(tvm_ffi.structural_equal(other, shape) for other in produced):
            continue  # a broadcast (a squeeze-excite scale over all pixels): it stays a pass of its own
        try:
            sch.reverse_compute_inline(block)
        except s_tir.ScheduleError:
            continue


PACK_BYTES = 1 << 20  # a matmul's weight above this (more than L2 keeps) is packed strip by strip


def _strips_outer(sch, main, local, before, fo, xo, reduction, fi, xi, reused: bool, work: int) -> None:
    """A matmul's loops: strips of ``v`` output columns outside the row tiles, so each strip of the
    weight ``[K, v]`` serves every row tile from cache instead of the whole weight streaming once per
    row tile. A weight above ``PACK_BYTES`` read by more than one row tile is first copied strip by
    strip into a contiguous ``[K, v]`` buffer: its rows are far apart (one page each at N = 1024), and
    walking them for every row tile misses the TLB."""
    sch.reorder(*before, xo, fo, *reduction, fi, xi)
    sch.reverse_compute_at(local, fo)
    stmt = sch.get(main)
    columns = stmt.iter_vars[len(stmt.iter_vars) - len(reduction) - 1].var  # the innermost spatial: v's axis
    weights = [
        index
        for index, region in enumerate(stmt.reads)
        if any(v.same_as(columns) for r in region.region for v in tirx.analysis.undefined_vars(r.min))
    ]
    if reused and len(weights) == 1 and _bytes(stmt.reads[weights[0]].source) > PACK_BYTES:
        packed = sch.cache_read(main, weights[0], "global")
        sch.compute_at(packed, xo)
        sch.vectorize(sch.get_loops(packed)[-1])
        _parallel(sch, sch.fuse(*before, xo), work)
    else:
        _parallel(sch, sch.fuse(*before, xo, fo), work)


def _bytes(buffer) -> int:
    return math.prod(int(d) for d in buffer.shape) * tvm.DataType(buffer.dtype).bits // 8


REUSE_ROWS = 4  # rows a register tile prefers to have: each reuses the streamed v-wide operand once more


def register_tile(rows: int, width: int, registers: RegisterFile) -> tuple[int, int]:
    """``(ft, v)``: ``ft`` rows (a divisor of ``rows`` up to 8, so a tile never straddles a row) x ``v``
    lanes (a divisor of ``width``) of accumulators within ``registers.accumulators`` vector registers.
    Preferred, in order: at least 7 accumulators (FMA latency x ports), at least ``REUSE_ROWS`` rows
    (each reuses the streamed ``v``-wide operand, e.g. a weight row, once more), then the fewest loads
    per FMA. Filling every register costs more than it saves: the spills outweigh the reuse."""
    widths = {_vector_lanes(width)} | {v for v in (8, 16, 32, 64) if width % v == 0}
    tiles = []
    for v in widths:
        vectors = -(-v // registers.lanes)
        for ft in (8, 7, 6, 5, 4, 3, 2, 1):
            if rows % ft == 0 and ft * vectors <= registers.accumulators:
                accumulators = ft * vectors
                tiles.append((min(accumulators, 7), min(ft, REUSE_ROWS), -(ft + vectors) / accumulators, ft, v))
    ft, v = max(tiles)[-2:]
    return ft, v


def _channel_axis(sch: s_tir.Schedule, block) -> int | None:
    """The output-channel iterator of a conv block: the one spatial iterator its weight is indexed by
    (1 in NCHW, 3 in NHWC); None if no read has exactly one."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) != _REDUCE]
    for region in stmt.reads:
        used = {
            i
            for i, var in enumerate(spatial)
            for r in region.region
            if any(v.same_as(var) for v in tirx.analysis.undefined_vars(r.min))
        }
        if len(used) == 1:
            return used.pop()
    return None


def _kind(sch: s_tir.Schedule, block) -> str | None:
    """ "conv" (n f [y] x | rc [ry] rx), "matmul" (spatial..., one reduction), else None."""
    kinds = [int(i.iter_type) for i in sch.get(block).iter_vars]
    if kinds in ([0] * 3 + [_REDUCE] * 2, [0] * 4 + [_REDUCE] * 3):
        return "conv"
    if len(kinds) >= 3 and kinds == [0] * (len(kinds) - 1) + [_REDUCE]:
        return "matmul"
    return None


class KernelEpilogue(dlight.ScheduleRule):
    """A scheduled kernel fused with the elementwise ops after it (``FuseOps`` on a kernel whose output
    block is marked :data:`FUSABLE_OUTPUT`, then
    :class:`~lpbq_tvm.passes.narrow_fused_epilogues.NarrowFusedEpilogues` and ``FuseTIR``): the ops
    inlined into one expression computed in that block, as each output tile is written
    (:func:`_inline_epilogue`); an op that cannot be inlined keeps its own pass, parallel and
    vectorised. The kernel's own schedule is kept."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if (opened := _open(func, target)) is None:
            return None
        sch, blocks = opened
        marked = [i for i, block in enumerate(blocks) if FUSABLE_OUTPUT in sch.get(block).annotations]
        if len(marked) != 1:
            return None
        epilogue = blocks[marked[0] + 1 :]
        names = {sch.get(block).name_hint for block in epilogue}
        _inline_epilogue(sch, epilogue)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint in names:
                _parallel_elementwise(sch, block)
        return sch


class Elementwise(dlight.ScheduleRule):
    """A function of elementwise blocks (batch norm, activations, casts), optionally ending in one
    reduction that is its output (pooling after an activation): producers inlined into their
    consumers where possible, except the reduction's own inputs, which stay vectorised stages; then
    each remaining spatial block parallel and vectorised, and the reduction parallel over the axes
    it keeps."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if (opened := _open(func, target)) is None:
            return None
        sch, blocks = opened
        reducing = [block for block in blocks if _reduces(sch, block)]
        outputs = {sch.get(block) for block in sch.get_output_blocks(sch.get_sblock("root"))}
        if not blocks or len(reducing) > 1 or (reducing and sch.get(reducing[0]) not in outputs):
            return None
        if reducing and len(blocks) == 1:
            return None  # a lone reduction: dlight's rule
        producers = [producer for block in reducing for producer in sch.get_producers(block)]
        kept = {sch.get(block).name_hint for block in producers} | {stmt.name_hint for stmt in outputs}
        for block in blocks:  # (by name: a block's statement changes as producers are inlined into it)
            if sch.get(block).name_hint not in kept:
                try:
                    sch.compute_inline(block)
                except s_tir.ScheduleError:
                    continue
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if _reduces(sch, block):
                _parallel_reduction(sch, block)
            else:
                _parallel_elementwise(sch, block)
        return sch


class LaneReduction(dlight.ScheduleRule):
    """Row reductions (softmax, RMS / layer norm, a row's range): reductions along the innermost axis,
    elementwise blocks over the same rows and blocks of one value per row (a norm's scale, a row's
    encoding), each row's reductions split over the vector's lanes. A kept-dims reduction's rows
    (``ReduceMean`` with ``keepdims``, then the norm over ``[.., rows, K]``: PyTorch's RMSNorm) are
    rows too; dlight's rule took that norm's elements for its rows and summed the whole row again
    for each element (576 times for a decoder step's norm of one 576-wide token).

    dlight's CPU rule reduces a row serially, one dependent max or add per element: latency-bound,
    four cycles an element, which made a softmax over 256 keys 85% of its own time. Here each
    reduction (its one reduction axis innermost, a multiple of the lanes and at least two vectors
    long) is ``rfactor``-ed while it is still alone in its loop nest, as rfactor requires: an
    ``_rf`` block of one partial result per lane, vectorised, then a reduction of the lanes. Then,
    as dlight does, the rows are fused in the last block, parallel from ``MIN_PARALLEL`` iterations
    (dlight's rule makes them parallel whatever their number: a decoder step's 9 softmax rows of 16
    keys paid for starting the thread pool), and every block is computed per row, the elementwise
    ones vectorised; a row too short to split is reduced serially in the same schedule. A max is
    exact in any order; a sum adds in another order (lanes, then across them), within the same
    ``n · u · Σ|x|`` bound as the serial order. Functions of another shape are left to the next rule.
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if (opened := _open(func, target)) is None:
            return None
        sch, blocks = opened
        lanes = max(llvm_get_vector_width(target), 128) // 32
        kinds = ["".join("R" if int(v.iter_type) == _REDUCE else "S" for v in sch.get(b).iter_vars) for b in blocks]
        rank = max(len(k) for k in kinds)
        shapes_agree = all(len(sch.get_loops(b)) == len(k) for b, k in zip(blocks, kinds, strict=True))
        if len(blocks) < 2 or rank < 2 or not shapes_agree or "R" in kinds[-1]:
            return None
        shapes = ("S" * rank, "S" * (rank - 1) + "R", "S" * (rank - 1))  # elementwise, row reduction, per row
        if any(k not in shapes for k in kinds) or all("R" not in k for k in kinds):
            return None
        reductions = [b for b, k in zip(blocks, kinds, strict=True) if k.endswith("R")]
        row_shapes = {_written_shape(sch, b) for b in reductions}
        # A kept-dims reduction ([.., rows, 1] from [.., rows, K]) writes rank - 1 dims, and so does an
        # elementwise block over its full rows ([.., rows, K]: the norm itself, as ONNX's ReduceMean with
        # keepdims and a Div after it give): that block runs per row too, over its last axis.
        full_rows = {_full_row_shape(sch, b) for b in reductions} - {None}
        lower = [_written_shape(sch, b) for b, k in zip(blocks, kinds, strict=True) if len(k) < rank]
        if any(shape not in row_shapes | full_rows for shape in lower):
            return None  # a block of lower rank that is neither one value per row nor a full row
        work = max(_iterations(sch, block) for block in blocks)
        factored = [name for block in reductions if (name := _split_over_lanes(sch, block, lanes))]
        root = sch.get_sblock("root")
        outputs = {buffer.name for buffer in func.params}
        _inline_elementwise_chains(sch, outputs)
        *others, last = sch.get_child_blocks(root)
        if any(_written(sch, b) & outputs for b in others):
            # Several outputs (a row's scale and zero point): an output block cannot move into another's
            # loops, so each stays a loop nest of its own; the per-lane partial results are still vectors.
            for name in factored:
                sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
            return sch
        loops = sch.get_loops(last)
        whole = len(loops) == rank or _written_shape(sch, last) in full_rows
        rows = sch.fuse(*(loops[:-1] if whole else loops))  # a per-row block: all its loops
        _parallel(sch, rows, work)
        for block in reversed(sch.get_child_blocks(root)[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block in sch.get_child_blocks(root):
            loops = sch.get_loops(block)[1:]
            if sch.get(block).name_hint in factored:  # (lane, k) and unit loops: k outside, the lanes a vector
                lane, k = (loop for loop in loops if get_extent(sch, loop) != 1)
                sch.reorder(k, lane)
                sch.vectorize(lane)
            elif loops and not _reduces(sch, block) and isinstance(extent := get_extent(sch, loops[-1]), int):
                _, vector = sch.split(loops[-1], [None, _vector_lanes(extent)])
                sch.vectorize(vector)
        return sch


def _full_row_shape(sch: s_tir.Schedule, block) -> tuple | None:
    """The shape of the rows a kept-dims reduction reduces (``[.., rows, K]`` for its ``[.., rows, 1]``), or None."""
    shape, reduction = sch.get(block).writes[0].source.shape, sch.get(block).iter_vars[-1].dom.extent
    if not shape or not isinstance(shape[-1], tirx.IntImm) or int(shape[-1]) != 1:
        return None
    return (*_written_shape(sch, block)[:-1], str(reduction))


def _split_over_lanes(sch: s_tir.Schedule, block, lanes: int) -> str | None:
    """``block``'s reduction along its innermost loop ``rfactor``-ed into one partial result per vector lane
    (the ``_rf`` block's name, its lane loop innermost), when that loop is a multiple of the lanes and at
    least two vectors long; else None (the block unchanged). The block must still be alone in its loop
    nest, as rfactor requires."""
    row = sch.get_loops(block)[-1]
    extent = get_extent(sch, row)
    if not (isinstance(extent, int) and extent % lanes == 0 and extent >= 2 * lanes):
        return None
    _, lane = sch.split(row, [None, lanes])
    last_axis = len(sch.get(block).writes[0].source.shape)  # each lane's partial result last
    return sch.get(sch.rfactor(lane, factor_axis=last_axis)).name_hint


def _inline_elementwise_chains(sch: s_tir.Schedule, outputs: set[str]) -> None:
    """Each elementwise block read by exactly one elementwise block computed inline into it (a function's
    output stays a block of its own)."""
    for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        consumers = sch.get_consumers(block)
        output = _written(sch, block) & outputs
        if not (_reduces(sch, block) or output) and len(consumers) == 1 and not _reduces(sch, consumers[0]):
            sch.compute_inline(block)


class Fallible(dlight.ScheduleRule):
    """Another rule whose schedule errors leave the function to the next rule (or unscheduled, to
    TVM's plain loops) instead of failing the build: TVM's own dlight rules assume more than they
    check (``dlight.cpu.Reduction`` calls ``compute_at`` on a second output block, as an average
    pool fused with a dropout's mask has, and fails)."""

    def __init__(self, rule: dlight.ScheduleRule):
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        try:
            return self.rule.apply(func, target, tunable)
        except s_tir.ScheduleError as error:
            logger.debug("%s does not apply: %s", type(self.rule).__name__, str(error).strip().splitlines()[-1])
            return None


def _parallel_reduction(sch: s_tir.Schedule, block) -> None:
    """The kept (spatial) loops of a reduction fused and parallel; the reduction runs serially inside."""
    kinds = [int(i.iter_type) for i in sch.get(block).iter_vars]
    loops = sch.get_loops(block)
    if len(kinds) != len(loops) or _REDUCE not in kinds:
        return
    first = kinds.index(_REDUCE)
    if first and all(kind == _REDUCE for kind in kinds[first:]):
        _parallel(sch, sch.fuse(*loops[:first]), _iterations(sch, block))


def _touches_float8(sch: s_tir.Schedule, block) -> bool:
    stmt = sch.get(block)
    return any(str(region.source.dtype).startswith("float8") for region in [*stmt.reads, *stmt.writes])


def _written(sch: s_tir.Schedule, block) -> set[str]:
    """The names of the buffers ``block`` writes."""
    return {region.source.name for region in sch.get(block).writes}


def _written_shape(sch: s_tir.Schedule, block) -> tuple:
    return tuple(str(d) for d in sch.get(block).writes[0].source.shape)


def _reduces(sch: s_tir.Schedule, block) -> bool:
    return any(int(i.iter_type) == _REDUCE for i in sch.get(block).iter_vars)


def _open(func: tirx.PrimFunc, target: tvm.target.Target):
    """A schedule of ``func`` and its root's blocks, or None when the rules do not apply to it (not
    an LLVM target, or a function without a root block, i.e. already lowered)."""
    if not isinstance(func, tirx.PrimFunc) or "llvm" not in str(target.kind):
        return None
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except (tvm.error.InternalError, s_tir.ScheduleError):
        return None
    return sch, sch.get_child_blocks(root)


def _transposing_read(sch: s_tir.Schedule, block) -> tuple[int, int] | None:
    """Loop indices ``(j, w)`` when the block writes along loop ``w`` (its innermost longer than 1) but
    reads a buffer whose last axis follows loop ``j`` instead: a transpose, e.g. NCHW from a dense
    kernel's ``[pixels, channels]``. None otherwise."""
    stmt, loops = sch.get(block), sch.get_loops(block)
    if len(stmt.iter_vars) != len(loops):
        return None
    longer = [i for i, loop in enumerate(loops) if int(sch.get(loop).extent) > 1]
    if len(longer) < 2:
        return None
    w, variables = longer[-1], [iv.var for iv in stmt.iter_vars]
    for region in stmt.reads:
        used = tirx.analysis.undefined_vars(region.region[-1].min) if len(region.region) >= 2 else []
        if any(v.same_as(variables[w]) for v in used):
            continue
        for j in longer[:-1]:
            if any(v.same_as(variables[j]) for v in used):
                return j, w
    return None


MIN_INNER = 8  # a shorter innermost loop is fused with the one outside it
# Iterations below which a block runs serially: at two threads, starting the thread pool's tasks costs
# what 16 K vectorised elementwise iterations take (docs/performance.md, "Small blocks run serially"),
# and a decoder's step is hundreds of smaller blocks (a token's residual add, norm, rotary embedding,
# cache write).
MIN_PARALLEL = 1 << 14


def _iterations(sch: s_tir.Schedule, block) -> int:
    """The block's iterations (the product of its loops' extents; a size known only at run time counts as large)."""
    total = 1
    for loop in sch.get_loops(block):
        extent = get_extent(sch, loop)
        total *= extent if isinstance(extent, int) else MIN_PARALLEL
    return total


def _parallel(sch: s_tir.Schedule, loop, iterations: int) -> None:
    """``loop`` parallel, unless the work it splits is under ``MIN_PARALLEL`` iterations."""
    if iterations >= MIN_PARALLEL:
        sch.parallel(loop)


def _parallel_elementwise(sch: s_tir.Schedule, block) -> None:
    """Parallel outer loop and vectorised inner loop of a spatial block (left alone if it reduces); an
    innermost loop shorter than ``MIN_INNER`` is fused with the one outside it first (padding a
    224 x 224 x 3 image would otherwise run 224 · 224 parallel iterations of 3-lane vectors). A
    transposing block is tiled instead: ``tile x lanes`` squares, so each square reads whole cache
    lines of the source along ``j`` while it writes vectors along ``w``. A scalar (rank-0) block has no
    loop to schedule, nor does a block whose sizes are known only at run time; a block on float8 data
    is not vectorised (TVM emulates float8 one value at a time, with a select its vectorised form
    does not have)."""
    loops = sch.get_loops(block)
    if _reduces(sch, block) or not loops or not all(isinstance(sch.get(loop).extent, tirx.IntImm) for loop in loops):
        return  # (a size known only at run time, as after NonZero or Compress, stays TVM's plain loop)
    vectorize = sch.vectorize if not _touches_float8(sch, block) else lambda _loop: None
    work = _iterations(sch, block)
    if (transposing := _transposing_read(sch, block)) is not None:
        j, w = transposing
        jo, ji = sch.split(loops[j], [None, _largest_divisor(int(sch.get(loops[j]).extent), (16, 8, 4, 2))])
        wo, wi = sch.split(loops[w], [None, _vector_lanes(int(sch.get(loops[w]).extent))])
        others = [loop for i, loop in enumerate(loops) if i not in (j, w)]
        sch.reorder(*others, jo, wo, ji, wi)
        _parallel(sch, sch.fuse(*others, jo), work)
        sch.unroll(ji)
        vectorize(wi)
        return
    while len(loops) >= 3 and int(sch.get(loops[-1]).extent) < MIN_INNER:
        loops = [*loops[:-2], sch.fuse(*loops[-2:])]
    if len(loops) >= 2:
        _parallel(sch, sch.fuse(*loops[:-1]), work)
    inner = loops[-1]
    lanes = _vector_lanes(int(sch.get(inner).extent))
    if lanes > 1:
        _, vector = sch.split(inner, [None, lanes])
        vectorize(vector)
