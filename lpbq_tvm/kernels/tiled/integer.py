"""What the integer kernels (W4A8, W4A16) of the CPU families share: inputs, codes, the exact accumulator, output.

Every integer kernel computes ``main(x, qw, kw, wsum, s, sx, zx, [bias], y)``: ``x`` float32 ``[M, K]`` is
quantized in-kernel with the input encoding ``sx`` / ``zx`` read at run time (so that layers of one
shape share one compiled kernel), ``xq = clamp(round_half_even(x / sx) + zx, 0, qmax)`` (a true division, as the
reference), ``acc = Σ_i (xq − zx) · (q · k)`` exactly, ``y = float32(acc) · sx · s[n]``, then
``+ bias[n]``, each rounded on its own: bit-exact with :func:`lpbq_tvm.reference.dense_int`. A
*row-wise* kernel (mode ``w4a8-dynamic``, :class:`~lpbq_tvm.calibration.RowwiseEncoding`) takes an encoding
per row instead, ``sx[M]`` and ``zx[M]`` right after ``x``: ``main(x, sx, zx, qw, kw, wsum, s, [bias], y)``,
computed before it from each row's range by :func:`lpbq_tvm.kernels.generic.row_encodings`.
``qw`` / ``kw`` / ``wsum`` are the integer layout of :mod:`~lpbq_tvm.kernels.tiled.repack`.

A uint16 code runs as two *byte planes*, ``xq = 256 · hi + lo``: two rows of the uint8 kernel,
each plane's sum exact in int32 (255 · 128 · K fits up to ``MAX_K``). :func:`build_byte_planes`
builds such a kernel around one of the uint8 schemes (:mod:`~lpbq_tvm.kernels.tiled.nibble`,
:mod:`~lpbq_tvm.kernels.x86.block_dot`, :mod:`~lpbq_tvm.kernels.x86.fold_k`), each a module with
``accumulate(problem)`` (the int32 ``Acc [rows, NT, lanes]`` of ``Σ xq · q · k``, or, for a scheme with
``CODE_OFFSET = c``, of ``Σ (xq − c) · q · k``) and ``schedule(sch, problem)``.

The output passes an ``llvm.arithmetic.fence`` (:func:`~lpbq_tvm.kernels.generic.rounded`) before the
bias add: LLVM may not contract the scale product with the add that follows into one FMA, so the
kernel keeps the reference's two roundings even when a fused batch norm or activation joins its
output block.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding
from lpbq_tvm.kernels.generic import rounded
from lpbq_tvm.kernels.tiled.decode import byte, k_value, nibbles
from lpbq_tvm.kernels.tiled.repack import LANES
from lpbq_tvm.kernels.tiled.schedule import finish, schedule_codes, tile_lanes

__all__ = [
    "MAX_K",
    "W4A16_INT32_MAX_K",
    "DotInstructions",
    "Problem",
    "build_byte_planes",
    "code",
    "folded_dot",
    "int8_tile",
    "encoding_inputs",
    "integer_inputs",
    "integer_output",
]

MAX_K = 65536  # a byte plane's uint8 · int8 sums fit int32 up to here (255 · 128 · K)
W4A16_INT32_MAX_K = (2**31 - 1) // (65535 * 128)  # = 256: W4A16's Σ (xq − zx) · q · k fits int32 up to here


@dataclass(frozen=True)
class DotInstructions:
    """A kernel family's dot-product instructions, as the schemes see them."""

    name: str | None  # the family's name for them ("vnni", "avx2", "udot", ...) or None: plain vector code
    lanes: int  # int32 lanes of one instruction: the channels the nibble scheme's intrinsic computes
    nibble_intrinsic: str | None = None  # the nibble scheme's tensor intrinsic (None: vectorized loops)
    lane_pair_intrinsic: str | None = None  # the lane-pair scheme's (a family without one does not use it)


@dataclass(frozen=True)
class Problem:
    """A uint8 kernel of byte-plane rows being built: its shape, settings and input tensors."""

    M: int
    N: int
    K: int
    B: int
    planes: int  # byte planes per code: 1 (uint8), 2 (uint16)
    dot: DotInstructions
    target: tvm.target.Target
    tune: Any  # the family's tuning: nibble_rows, parallel_code_rows and what its schemes read
    lanes: int  # lanes computed per channel tile
    xq: te.Tensor  # uint8 [rows, K]: plane p of row m is row planes · m + p
    qw: te.Tensor
    kw: te.Tensor

    @property
    def rows(self) -> int:
        return self.planes * self.M

    @property
    def tiles(self) -> int:
        return -(-self.N // LANES)


def int8_tile(p: Problem, by_lane: bool = False) -> te.Tensor:
    """``Wd [NT, K/8, 2, lanes]`` int32: the four int8 ``q·k`` (two's complement bytes) of k-positions
    ``8g + 4h + j`` of each lane, decoded from the integer layout (the fold-k schemes' decoded tile);
    ``by_lane``: ``[NT, K/8, lanes, 2]``, a lane's eight bytes of ``g`` adjacent (the matrix-multiply scheme's).

    Per byte ``u·k <= 240``; ``+ (128 − 8k)`` gives ``q·k + 128`` in 0..240 with no carry between bytes;
    ``^ 0x80`` per byte is the two's complement byte of ``q·k``."""

    def decode(t, g, hh, lane):
        kv = k_value(p.kw, t, (g * 8) // p.B, "uint32")(lane)
        offset = (tirx.const(128, "uint32") - kv * tirx.const(8, "uint32")) * tirx.const(0x01010101, "uint32")
        word = (nibbles(p.qw[t, g, lane], hh) * kv + offset) ^ tirx.const(0x80808080, "uint32")
        return word.astype("int32")

    def value(t, g, a, b):
        hh, lane = (b, a) if by_lane else (a, b)
        return tirx.Select(hh == 0, decode(t, g, 0, lane), decode(t, g, 1, lane))

    last_two = (p.lanes, 2) if by_lane else (2, p.lanes)
    return te.compute((p.tiles, p.K // 8, *last_two), value, name="Wd")


def folded_dot(p: Problem, code_offset: int) -> te.Tensor:
    """The fold-k schemes' ``Acc [rows, NT, lanes]``: ``Σ (xq − code_offset) · q·k`` over the decoded tile
    :func:`int8_tile`, reduced over (g, h, j) as the dot instructions take it."""
    xq, wd = p.xq, int8_tile(p)
    g, h, jj = te.reduce_axis((0, p.K // 8), "g"), te.reduce_axis((0, 2), "h"), te.reduce_axis((0, 4), "jj")

    def code(m):  # no subtraction of 0: the tensor intrinsics' descriptions must match the body as written
        value = xq[m, 8 * g + 4 * h + jj].astype("int32")
        return value - code_offset if code_offset else value

    return te.compute(
        (p.rows, p.tiles, p.lanes),
        lambda m, t, lane: te.sum(code(m) * byte(wd[t, g, h, lane], jj), axis=[g, h, jj]),
        name="Acc",
    )


def integer_inputs(M, N, K, B, with_bias):
    """(x, qw, kw, wsum, s, sx, zx, bias or None): the integer kernels' inputs. The input's encoding, its
    scale ``sx`` (float32) and zero point ``zx`` (int32), is one-element tensors read at run time, so the
    kernels of layers of one shape are one function (compiled once) whatever their calibration."""
    nt, nbh = -(-N // LANES), -(-(K // B) // 2)
    return (
        te.placeholder((M, K), "float32", "x"),
        te.placeholder((nt, K // 8, LANES), "uint32", "qw"),
        te.placeholder((nt, nbh, LANES), "uint8", "kw"),
        te.placeholder((N,), "int32", "wsum"),
        te.placeholder((N,), "float32", "s"),
        te.placeholder((1,), "float32", "sx"),
        te.placeholder((1,), "int32", "zx"),
        te.placeholder((N,), "float32", "bias") if with_bias else None,
    )


def encoding_inputs(encoding: ActivationEncoding | RowwiseEncoding) -> dict[str, np.ndarray]:
    """The run-time values of :func:`integer_inputs`' ``sx`` and ``zx`` for the input ``encoding``, by the names
    kernel choices give them (none for a :class:`RowwiseEncoding`: computed from each row); ``ValueError`` for a
    zero point outside the codes' range."""
    if isinstance(encoding, RowwiseEncoding):
        return {}
    if not 0 <= encoding.zero_point <= encoding.qmax:
        msg = f"zero point must lie in 0..{encoding.qmax}, got {encoding.zero_point}"
        raise ValueError(msg)
    return {"lpbq_sx": np.array([encoding.scale], np.float32), "lpbq_zx": np.array([encoding.zero_point], np.int32)}


def code(value, sx, zx, qmax: int):
    """The activation code ``np.clip(np.rint(value / sx) + zx, 0, qmax)`` in float32 (a division, not a
    reciprocal: bit-exact with the reference); ``sx`` a float32 and ``zx`` an int32 expression."""
    quantized = tirx.nearbyint(value / sx) + zx.astype("float32")
    return tirx.max(tirx.min(quantized, tirx.const(float(qmax), "float32")), tirx.const(0.0, "float32"))


def integer_output(M, N, acc, sx, s, bias):
    """``y = float32(acc) · sx · s[n] (+ bias[n])`` with the reference's roundings: each product, then
    the bias add (:func:`rounded`); ``acc(m, n)`` is the exact accumulator as float32, ``sx(m)`` row m's scale."""

    def value(m, n):
        scaled = rounded(acc(m, n) * sx(m) * s[n])
        return scaled + bias[n] if bias is not None else scaled

    return te.compute((M, N), value, name="y")


def _byte_plane_codes(x, planes: int, K: int, sx, zx, qmax: int) -> te.Tensor:
    """The uint8 rows of the codes: the code of ``x[r // planes, i]``, byte plane ``r % planes`` (high first);
    ``sx(m)`` / ``zx(m)`` the encoding of row ``m``."""

    def quantize(r, i):
        value = code(x[r // planes, i], sx(r // planes), zx(r // planes), qmax)
        if planes == 1:
            return value.astype("uint8")
        shift = (planes - 1 - r % planes) * 8
        return ((value.astype("int32") >> shift) & 255).astype("uint8")

    return te.compute((planes * int(x.shape[0]), K), quantize, name="xq")


def _exact_acc(acc, wsum, m, n, planes: int, K: int, zx):
    """``Σ (xq − zx) · w`` of output (m, n) from the planes' int32 sums. One plane: int32. From two it
    fits int32 up to K = ``W4A16_INT32_MAX_K``, so it is formed modulo 2^32 (in uint32, where wrapping
    is defined): the exact value. Above, in float64, where every term and sum is an integer below
    2^53 and so exact: rounding it to float32 equals rounding the int64 sum (AVX2 has no vector
    int64 -> float conversion; float64 vectorizes)."""
    if planes == 1:
        return acc[m, n // LANES, n % LANES] - wsum[n] * zx
    wide = "uint32" if K <= W4A16_INT32_MAX_K else "float64"
    total = tirx.const(0, wide)
    for p in range(planes):
        total = total * tirx.const(256, wide) + acc[planes * m + p, n // LANES, n % LANES].astype(wide)
    total = total - wsum[n].astype(wide) * zx.astype(wide)  # (int32 -> uint32 keeps zx modulo 2^32)
    return total.astype("int32") if wide == "uint32" else total


def build_byte_planes(
    M, N, K, B, bits: int, with_bias: bool, target, tune, dot: DotInstructions, scheme: ModuleType, rowwise=False
) -> tvm.tirx.PrimFunc:
    """The integer kernel of ``bits``-bit codes (8: one plane, 16: two) around a uint8 ``scheme``; each
    channel tile computes the lanes of 16-channel chunks its channels need. ``rowwise`` (8 bits): an
    encoding per row (module docstring)."""
    if rowwise and bits != 8:
        msg = f"row-wise scales are 8-bit codes, got {bits} bits"
        raise ValueError(msg)
    planes, qmax = bits // 8, (1 << bits) - 1
    lanes = tile_lanes(N, dot.lanes)
    x, qw, kw, wsum, s, sx, zx, bias = integer_inputs(M, N, K, B, with_bias)
    if rowwise:  # an encoding per row
        sx, zx = te.placeholder((M,), "float32", "sx"), te.placeholder((M,), "int32", "zx")
        scale, zero = (lambda m: sx[m]), (lambda m: zx[m])
    else:
        scale, zero = (lambda m: sx[0]), (lambda m: zx[0])
    xq = _byte_plane_codes(x, planes, K, scale, zero, qmax)
    problem = Problem(M, N, K, B, planes, dot, target, tune, lanes, xq, qw, kw)
    acc = scheme.accumulate(problem)
    # A scheme that accumulates signed bytes (code − CODE_OFFSET) owes each plane CODE_OFFSET · wsum back.
    owed = getattr(scheme, "CODE_OFFSET", 0) * (256**planes - 1) // 255
    exact = lambda m, n: _exact_acc(acc, wsum, m, n, planes, K, zero(m) - owed).astype("float32")  # noqa: E731
    y = integer_output(M, N, exact, scale, s, bias)
    arguments = (x, sx, zx, qw, kw, wsum, s, bias, y) if rowwise else (x, qw, kw, wsum, s, sx, zx, bias, y)
    sch = Schedule(te.create_prim_func([t for t in arguments if t is not None]))
    schedule_codes(sch, "xq", tune.parallel_code_rows)
    scheme.schedule(sch, problem)
    return finish(sch, sch.get_sblock("y"))
