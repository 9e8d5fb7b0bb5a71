"""Tensor-expression definitions of the LPBQ kernels that :mod:`lower_lpbq` emits.

Every kernel reads the packed storage of :mod:`lpbq_tvm.packing` directly:

* ``q``  uint8 ``[C, ceil(L/2)]`` — 4-bit two's-complement codes, low nibble first, along the
  canonical row (block axis outermost, then any kernel positions);
* ``k``  uint8 ``[C, ceil(nb/2)]`` — ``k - 1`` nibbles;
* ``s``  float32 ``[C]`` — the per-channel float scale.

and computes (weight-only mode, DESIGN.md §3) ``acc = Σ x · float(q · k)`` followed by the
epilogue ``y = acc · s[c] (+ bias[c])``. ``q · k`` is the int8 per-channel weight that makes LPBQ
hardware friendly; it never exists in memory as fp32 outside one kernel invocation.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, topi

__all__ = ["dense_weight_only", "conv_weight_only"]


def _nibble(packed: te.Tensor, row, index):
    """Nibble ``index`` of byte row ``row`` (0..15, int32): low nibble of byte index // 2 first."""
    byte = packed[row, index // 2].astype("int32")
    return (byte >> ((index % 2) * 4)) & 15


def _int_weight(q: te.Tensor, k: te.Tensor, row, index, block):
    """``q[row, index] * k[row, block]`` as int32 (the int8 per-channel weight of DESIGN.md §3)."""
    code = (_nibble(q, row, index) ^ 8) - 8  # sign-extend the 4-bit two's complement code
    return code * (_nibble(k, row, block) + 1)


def _epilogue(acc: te.Tensor, s: te.Tensor, bias: te.Tensor | None, channel_axis: int) -> te.Tensor:
    """``acc · s[c] (+ bias)``; the bias broadcasts numpy-style (it varies along channels only)."""

    def output(*index):
        value = acc(*index) * s[index[channel_axis]]
        if bias is None:
            return value
        aligned = index[len(index) - len(bias.shape) :]
        return value + bias(*[0 if int(extent) == 1 else i for i, extent in zip(aligned, bias.shape, strict=True)])

    return te.compute(acc.shape, output, name="lpbq_out")


def dense_weight_only(
    x: te.Tensor, q: te.Tensor, k: te.Tensor, s: te.Tensor, bias: te.Tensor | None = None, *, block_size: int
) -> te.Tensor:
    """``y[..., n] = s[n] · Σ_i x[..., i] · q[n, i] · k[n, i // B] (+ bias[n])``; x is ``[..., K]``."""
    reduce_len = x.shape[-1]
    channels = q.shape[0]
    i = te.reduce_axis((0, reduce_len), name="i")

    def accumulate(*index):
        n = index[-1]
        value = _int_weight(q, k, n, i, i // block_size).astype("float32")
        return te.sum(x(*index[:-1], i) * value, axis=i)

    acc = te.compute((*x.shape[:-1], channels), accumulate, name="lpbq_acc")
    return _epilogue(acc, s, bias, len(x.shape) - 1)


def conv_weight_only(
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
) -> te.Tensor:
    """Conv (1-D / 2-D, NCW / NCHW, grouped) over ``q · k``, then ``· s[o] (+ bias[o])``.

    The weight ``[O, I/groups, *kernel]`` is expanded from the packed codes inside the kernel.
    """

    def weight(o, c, *kernel_index):
        flat = c
        for position, extent in zip(kernel_index, weight_shape[2:], strict=True):
            flat = flat * int(extent) + position
        return _int_weight(q, k, o, flat, c // block_size).astype("float32")

    expanded = te.compute(tuple(int(d) for d in weight_shape), weight, name="lpbq_weight")
    acc = topi.nn.conv(x, expanded, strides, padding, dilation, groups, data_layout, "")
    return _epilogue(acc, s, bias, channel_axis=1)
