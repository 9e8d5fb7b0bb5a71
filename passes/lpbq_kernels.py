"""Tensor-expression definitions of the LPBQ kernels that :mod:`lower_lpbq` emits.

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
  pre-bias encoding) — exactly :mod:`lpbq_tvm.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tvm import te, tirx, topi

from lpbq_tvm.calibration import ActivationEncoding

__all__ = ["IntegerArithmetic", "dense_kernel", "conv_kernel"]


@dataclass(frozen=True)
class IntegerArithmetic:
    """Integer kernel settings: the input encoding and, for requantized outputs, the output encoding."""

    input_encoding: ActivationEncoding
    output_encoding: ActivationEncoding | None = None
    pre_bias_encoding: ActivationEncoding | None = None  # requantize before the bias add too (QNN MatMul + Add)

    @property
    def accumulator(self) -> str:
        """int32 for 8-bit activations; int64 for 16-bit (65535 · 128 · K overflows int32 from K = 256)."""
        return "int32" if self.input_encoding.bitwidth <= 8 else "int64"


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


def _quantize(value, encoding: ActivationEncoding):
    """``clamp(round_half_even(value / scale) + zero_point, 0, qmax)`` as float32 (an exact integer)."""
    code = tirx.nearbyint(value / tirx.const(encoding.scale, "float32")) + tirx.const(encoding.zero_point, "float32")
    return tirx.max(tirx.min(code, tirx.const(encoding.qmax, "float32")), tirx.const(0, "float32"))


def _fake_quantize(value, encoding: ActivationEncoding):
    """Quantize, then dequantize: ``(code - zero_point) · scale`` (QDQ)."""
    code = _quantize(value, encoding) - tirx.const(encoding.zero_point, "float32")
    return code * tirx.const(encoding.scale, "float32")


def _operand(x: te.Tensor, integer: IntegerArithmetic | None) -> tuple[te.Tensor, str]:
    """The activation as the kernel multiplies it: x itself, or its centred integer codes ``xq − zx``."""
    if integer is None:
        return x, "float32"
    encoding, dtype = integer.input_encoding, integer.accumulator
    zero_point = tirx.const(encoding.zero_point, dtype)
    codes = te.compute(
        x.shape, lambda *i: _quantize(x(*i), encoding).astype(dtype) - zero_point, name="lpbq_input_codes"
    )
    return codes, dtype


def _epilogue(
    acc: te.Tensor, s: te.Tensor, bias: te.Tensor | None, channel_axis: int, integer: IntegerArithmetic | None
) -> te.Tensor:
    """``acc · [sx ·] s[c]``, then ``+ bias`` and the optional requantization; the bias broadcasts numpy-style.

    The bias add is a stage of its own: with the product in the same expression LLVM would fuse
    them into one FMA, whose single rounding differs from the reference's two.
    """

    def scaled(*index):
        if integer is None:
            return acc(*index) * s[index[channel_axis]]
        value = acc(*index).astype("float32") * tirx.const(integer.input_encoding.scale, "float32")
        return value * s[index[channel_axis]]

    result = te.compute(acc.shape, scaled, name="lpbq_scaled")
    requantize = integer is not None and integer.output_encoding is not None
    if bias is None and not requantize:
        return result
    if requantize and integer.pre_bias_encoding is not None:
        # A stage of its own too: its dequantize ``(code - z) * s`` followed by the bias add in one
        # expression becomes an FMA once the loop is vectorised.
        pre_bias = integer.pre_bias_encoding
        result = te.compute(acc.shape, lambda *i: _fake_quantize(result(*i), pre_bias), name="lpbq_pre_bias")

    def output(*index):
        value = result(*index)
        if bias is not None:
            aligned = index[len(index) - len(bias.shape) :]
            bias_index = [0 if int(extent) == 1 else i for i, extent in zip(aligned, bias.shape, strict=True)]
            value = value + bias(*bias_index)
        if requantize:
            value = _fake_quantize(value, integer.output_encoding)
        return value

    return te.compute(acc.shape, output, name="lpbq_out")


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
    operand, dtype = _operand(x, integer)
    reduce_len = x.shape[-1]
    i = te.reduce_axis((0, reduce_len), name="i")

    def accumulate(*index):
        n = index[-1]
        return te.sum(
            operand(*index[:-1], i) * _int_weight(q, k, n, i, i // block_size, code_bits).astype(dtype), axis=i
        )

    acc = te.compute((*x.shape[:-1], q.shape[0]), accumulate, name="lpbq_acc")
    return _epilogue(acc, s, bias, len(x.shape) - 1, integer)


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
    integer mode, zero padding of the centred codes is the padding of the real value 0.
    """
    operand, dtype = _operand(x, integer)

    def weight(o, c, *kernel_index):
        flat = c
        for position, extent in zip(kernel_index, weight_shape[2:], strict=True):
            flat = flat * int(extent) + position
        return _int_weight(q, k, o, flat, c // block_size, code_bits).astype(dtype)

    expanded = te.compute(tuple(int(d) for d in weight_shape), weight, name="lpbq_weight")
    acc = topi.nn.conv(operand, expanded, strides, padding, dilation, groups, data_layout, "", out_dtype=dtype)
    return _epilogue(acc, s, bias, 1, integer)
