"""Generic LPBQ kernels: tensor expressions for every layer form on every target.

:class:`~lpbq_tvm.passes.lower_lpbq.LowerLPBQ` emits them for the layers no scheduled kernel takes
(:mod:`lpbq_tvm.kernels.interface`); the CPU pipeline schedules them with the rules of
:mod:`lpbq_tvm.kernels.schedule_rules`.

Every kernel reads the packed storage of :mod:`lpbq_tvm.packing` directly:

* ``q``  uint8 ``[C, ceil(L/2)]`` — 4-bit two's-complement codes, low nibble first, along the
  canonical row (block axis outermost, then any kernel positions);
* ``k``  uint8 ``[C, ceil(nb/2)]`` — ``k - 1`` nibbles;
* ``s``  float32 ``[C]`` — the per-channel float scale;

(``code_bits=8``: ``q`` int8 bytes ``[C, L]``, for int8 per-channel layers whose ``k`` is 1)
and forms the int8 per-channel weight ``q · k`` in-kernel (it never exists in memory outside one
kernel invocation). Arithmetic (docs/design.md §3):

* weight-only: ``acc = Σ x · float(q · k)`` in float32, ``y = acc · s[c] (+ bias[c])``;
* integer (:class:`IntegerArithmetic`, W4A8 / W4A16): ``xq = clamp(round_half_even(x / sx) + zx)``,
  ``acc = Σ (xq − zx) · (q · k)`` in int32 / int64, ``y = float32(acc) · sx · s[c] (+ bias[c])``,
  optionally requantized to the output encoding (and, for a MatMul + Add bias, first to the
  pre-bias encoding) — exactly :mod:`lpbq_tvm.reference`. Mode ``w4a8-dynamic`` (dense layers): ``sx`` and
  ``zx`` per row of ``x``, :func:`row_encodings`.

The epilogue keeps the reference's roundings: a product that an add follows (the scaled accumulator
before the bias, the pre-bias dequantization) passes an ``llvm.arithmetic.fence`` (:func:`rounded`), as
LLVM would otherwise contract the two into one FMA, whose single rounding differs from the reference's
two, wherever the stages end up in one loop. The stages also carry the block annotation
:data:`~lpbq_tvm.kernels.interface.SEPARATE_ROUNDING`, which keeps the schedule rules from inlining them.

Also here, for convs that run as a dense kernel: their tap-major im2col columns (:func:`im2col`)
and the weight encoding in the same order (:func:`tap_major`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tvm import te, tirx, topi

from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding
from lpbq_tvm.encoder import LPBQEncoding
from lpbq_tvm.kernels.interface import SEPARATE_ROUNDING, IntegerArithmetic

__all__ = ["conv_kernel", "dense_kernel", "im2col", "rounded", "row_encodings", "tap_major", "transposed_around"]

_SEPARATE = {SEPARATE_ROUNDING: 1}


def rounded(value):
    """``value``, rounded on its own: behind an ``llvm.arithmetic.fence``, which LLVM does not contract
    into an FMA with the add after it (a bias, a fused batch norm)."""
    return tirx.call_llvm_pure_intrin(value.ty.dtype, "llvm.arithmetic.fence", value)


def _nibble(packed: te.Tensor, row, index):
    """Nibble ``index`` of byte row ``row`` (0..15, int32): low nibble of byte index // 2 first."""
    byte = packed[row, index // 2].astype("int32")
    return (byte >> ((index % 2) * 4)) & 15


def _int_weight(q: te.Tensor, k: te.Tensor, row, index, block, code_bits: int):
    """``q[row, index] * k[row, block]`` as int32 (the int8 per-channel weight of docs/design.md §3)."""
    if code_bits == 8:
        return q[row, index].astype("int8").astype("int32") * (_nibble(k, row, block) + 1)
    code = (_nibble(q, row, index) ^ 8) - 8  # sign-extend the 4-bit two's complement code
    return code * (_nibble(k, row, block) + 1)


def row_encodings(x: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """Each row's :class:`~lpbq_tvm.calibration.RowwiseEncoding` (a row: the last axis of ``x``), in the
    same float32 steps: the scales (float32) and zero points (int32), shaped ``x.shape[:-1]``."""
    i = te.reduce_axis((0, x.shape[-1]), name="i")
    j = te.reduce_axis((0, x.shape[-1]), name="j")
    zero, qmax = tirx.const(0.0, "float32"), tirx.const(float(RowwiseEncoding.qmax), "float32")
    smallest = te.compute(x.shape[:-1], lambda *m: te.min(x(*m, i), axis=i), name="row_min")
    largest = te.compute(x.shape[:-1], lambda *m: te.max(x(*m, j), axis=j), name="row_max")
    low = lambda *m: tirx.min(smallest(*m), zero)  # noqa: E731

    def scale(*m):
        span = tirx.max(largest(*m), zero) - low(*m)
        return tirx.Select(span > zero, span / qmax, tirx.const(1.0, "float32"))

    scales = te.compute(x.shape[:-1], scale, name="row_scales")
    zero_points = te.compute(
        x.shape[:-1],
        lambda *m: tirx.max(tirx.min(tirx.nearbyint(-low(*m) / scales(*m)), qmax), zero).astype("int32"),
        name="row_zero_points",
    )
    return scales, zero_points


def _quantize(value, encoding: ActivationEncoding | RowwiseEncoding, scale=None, zero_point=None):
    """``clamp(round_half_even(value / scale) + zero_point, 0, qmax)`` as float32 (an exact integer); ``scale``
    and ``zero_point`` (int32) the encoding's unless given (a row's)."""
    scale = tirx.const(encoding.scale, "float32") if scale is None else scale
    zero_point = tirx.const(encoding.zero_point, "int32") if zero_point is None else zero_point
    code = tirx.nearbyint(value / scale) + zero_point.astype("float32")
    return tirx.max(tirx.min(code, tirx.const(encoding.qmax, "float32")), tirx.const(0, "float32"))


def _fake_quantize(value, encoding: ActivationEncoding):
    """Quantize, then dequantize: ``(code - zero_point) · scale`` (QDQ)."""
    code = _quantize(value, encoding) - tirx.const(encoding.zero_point, "float32")
    return code * tirx.const(encoding.scale, "float32")


def _operand(x: te.Tensor, integer: IntegerArithmetic | None) -> tuple[te.Tensor, str, te.Tensor | None]:
    """The activation as the kernel multiplies it: x itself, or its centred integer codes ``xq − zx``; and
    the rows' scales where they are computed at run time."""
    if integer is None:
        return x, "float32", None
    encoding, dtype = integer.input_encoding, integer.accumulator
    scales, zero_points = row_encodings(x) if integer.rowwise else (None, None)

    def centred(*i):
        zero_point = tirx.const(encoding.zero_point, "int32") if zero_points is None else zero_points(*i[:-1])
        scale = None if scales is None else scales(*i[:-1])
        return _quantize(x(*i), encoding, scale, zero_point).astype(dtype) - zero_point.astype(dtype)

    return te.compute(x.shape, centred, name="lpbq_input_codes"), dtype, scales


def _epilogue(
    acc: te.Tensor,
    s: te.Tensor,
    bias: te.Tensor | None,
    channel_axis: int,
    integer: IntegerArithmetic | None,
    scales: te.Tensor | None = None,
) -> te.Tensor:
    """``acc · [sx ·] s[c]``, then ``+ bias`` and the optional requantization; the bias broadcasts numpy-style.
    ``scales``: ``sx`` per row (a dense layer's, the channel axis last).

    The bias add is a stage of its own: with the product in the same expression LLVM would fuse
    them into one FMA, whose single rounding differs from the reference's two.
    """

    def scaled(*index):
        if integer is None:
            return acc(*index) * s[index[channel_axis]]
        sx = tirx.const(integer.input_encoding.scale, "float32") if scales is None else scales(*index[:-1])
        value = acc(*index).astype("float32") * sx
        return rounded(value * s[index[channel_axis]])

    result = te.compute(acc.shape, scaled, name="lpbq_scaled", attrs=_SEPARATE)
    requantize = integer is not None and integer.output_encoding is not None
    if bias is None and not requantize:
        return result
    if requantize and integer.pre_bias_encoding is not None:
        # Its dequantize ``(code - z) * s`` and the bias add after it are two roundings, not one FMA.
        pre_bias = integer.pre_bias_encoding
        result = te.compute(
            acc.shape,
            lambda *i: rounded(_fake_quantize(result(*i), pre_bias)),
            name="lpbq_pre_bias",
            attrs=_SEPARATE,
        )

    def output(*index):
        value = result(*index)
        if bias is not None:
            aligned = index[len(index) - len(bias.shape) :]
            bias_index = [0 if int(extent) == 1 else i for i, extent in zip(aligned, bias.shape, strict=True)]
            value = value + bias(*bias_index)
        if requantize:
            value = _fake_quantize(value, integer.output_encoding)
        return value

    return te.compute(acc.shape, output, name="lpbq_out", attrs=_SEPARATE)


def dense_kernel(
    x: te.Tensor,
    q: te.Tensor,
    k: te.Tensor,
    s: te.Tensor,
    bias: te.Tensor | None = None,
    *,
    block_size: int,
    code_bits: int = 4,
    integer: IntegerArithmetic | None = None,
) -> te.Tensor:
    """``y[..., n] = s[n] · Σ_i x[..., i] · q[n, i] · k[n, i // B] (+ bias[n])``; x is ``[..., K]``."""
    operand, dtype, scales = _operand(x, integer)
    reduce_len = x.shape[-1]
    i = te.reduce_axis((0, reduce_len), name="i")

    def accumulate(*index):
        n = index[-1]
        return te.sum(
            operand(*index[:-1], i) * _int_weight(q, k, n, i, i // block_size, code_bits).astype(dtype), axis=i
        )

    acc = te.compute((*x.shape[:-1], q.shape[0]), accumulate, name="lpbq_acc")
    return _epilogue(acc, s, bias, len(x.shape) - 1, integer, scales)


def conv_kernel(
    x: te.Tensor,
    q: te.Tensor,
    k: te.Tensor,
    s: te.Tensor,
    bias: te.Tensor | None = None,
    *,
    block_size: int,
    weight_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    data_layout: str,
    code_bits: int = 4,
    integer: IntegerArithmetic | None = None,
) -> te.Tensor:
    """Conv (1-D / 2-D, NCW / NCHW, grouped) over ``q · k``, then the epilogue.

    The weight ``[O, I/groups, *kernel]`` is expanded from the packed codes inside the kernel. In
    integer mode, zero padding of the centred codes is the padding of the real value 0; the input takes
    one encoding per tensor (not one per row).
    """
    if integer is not None and integer.rowwise:
        raise ValueError("a convolution's input takes one encoding per tensor, not one per row")
    operand, dtype, _ = _operand(x, integer)

    def weight(o, c, *kernel_index):
        flat = c
        for position, extent in zip(kernel_index, weight_shape[2:], strict=True):
            flat = flat * int(extent) + position
        return _int_weight(q, k, o, flat, c // block_size, code_bits).astype(dtype)

    expanded = te.compute(tuple(int(d) for d in weight_shape), weight, name="lpbq_weight")
    acc = topi.nn.conv(operand, expanded, strides, padding, dilation, groups, data_layout, "", out_dtype=dtype)
    return _epilogue(acc, s, bias, 1, integer)


def im2col(
    x: te.Tensor,
    *,
    kernel: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_spatial: Sequence[int],
    channels_last: bool,
) -> te.Tensor:
    """Tap-major columns of a conv input (NC[H]W, or NHWC with ``channels_last``), ``[N, *O, *kernel, C]``
    (the caller reshapes them to ``[N·prod(O), R·C]``): ``x[n, c, o·stride + r·dilation - pad]``, 0 in
    the padding."""
    n, c = (x.shape[0], x.shape[-1]) if channels_last else x.shape[:2]
    sizes = x.shape[1:-1] if channels_last else x.shape[2:]
    rank = len(kernel)

    def value(b, *indices):
        outs, taps, channel = indices[:rank], indices[rank : 2 * rank], indices[2 * rank]
        where = [o * st + r * d - p for o, r, st, d, p in zip(outs, taps, strides, dilation, padding, strict=True)]
        inside = tirx.all(*[tirx.all(i >= 0, i < size) for i, size in zip(where, sizes, strict=True)])
        read = x[(b, *where, channel)] if channels_last else x[(b, channel, *where)]
        return tirx.if_then_else(inside, read, tirx.const(0.0, x.dtype))

    return te.compute((n, *out_spatial, *kernel, c), value, name="im2col")


def transposed_around(kernel, x: te.Tensor, *operands: te.Tensor) -> te.Tensor:
    """A channels-first conv ``kernel`` on NHWC ``x`` (and an NHWC bias), its output back in NHWC: an
    NHWC conv (ChannelsLast) that has no dense form, e.g. a grouped one."""
    *weights, bias = operands if len(operands) == 4 else (*operands, None)
    nchw = topi.transpose(x, [0, 3, 1, 2])
    extra = [] if bias is None else [topi.reshape(bias, [1, int(bias.shape[-1]), 1, 1])]
    return topi.transpose(kernel(nchw, *weights, *extra), [0, 2, 3, 1])


def tap_major(encoding: LPBQEncoding) -> LPBQEncoding:
    """A conv weight's encoding ``[Cout, Cin, *kernel]`` as a dense ``[Cout, R·Cin]`` one whose columns
    run tap-major (the order of :func:`im2col`): each tap's input channels are contiguous, in the
    blocks of the original, with the original ``k`` repeated per tap. Same codes and scales, so the
    same arithmetic; identity for 1x1."""
    channels, inputs = encoding.shape[:2]
    taps = int(np.prod(encoding.shape[2:]))
    codes = np.moveaxis(encoding.int_weight.reshape(channels, inputs, taps), 2, 1).reshape(channels, taps * inputs)
    return dataclasses.replace(
        encoding,
        channel_axis=0,
        block_axis=1,
        int_weight=codes,
        per_block_int_scale=np.tile(encoding.per_block_int_scale, (1, taps)),
    )
