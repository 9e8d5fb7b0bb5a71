"""Numpy reference of the integer LPBQ kernels (docs/design.md §3): the semantics the TVM kernels match bit for bit.

For a layer with LPBQ weight codes ``q`` (int4), block scales ``k`` (1..16), channel scales ``s``
and an input activation encoding (``sx``, zero point ``zx``, uint8 or uint16)::

    xq  = clamp(round_half_even(x / sx) + zx, 0, 2**bw - 1)        # float32 division
    acc = Σ (xq - zx) · (q · k)                                    # int32 (uint8) / int64 (uint16)
    y   = float32(acc) · sx · s[c] (+ bias[c])                     # float32, in this order

and, when the layer's output is requantized (HTP semantics), ``y`` goes through its output
encoding: ``yq = clamp(round_half_even(y / sy) + zy, 0, 2**bw - 1)``, ``y = (yq - zy) · sy``.
``q · k`` lies in -128..112: the int8 per-channel weight of the layer. Padding of a convolution
is the real value 0, whose code is exactly ``zx``, so it contributes nothing to ``acc``.
Mode ``w4a8-dynamic`` (dense layers) computes ``sx`` and ``zx`` per row of ``x`` at run time, from the
row's range (:class:`~lpbq_tvm.calibration.RowwiseEncoding`); the formulas are the same, row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lpbq_tvm.calibration import ActivationEncoding

__all__ = ["accumulator_dtype", "int_weight", "dense_int", "conv_int", "epilogue"]


def accumulator_dtype(encoding: ActivationEncoding) -> np.dtype:
    """int32 for 8-bit activations; int64 for 16-bit, where 65535 · 128 · K overflows int32 from K = 256."""
    return np.dtype(np.int32 if encoding.bitwidth <= 8 else np.int64)


def int_weight(q: np.ndarray, k: np.ndarray, block_elements: int) -> np.ndarray:
    """``q · k`` as int32 in the canonical ``[C, L]`` view; a block covers ``block_elements`` of a row."""
    return q.astype(np.int32) * np.repeat(k.astype(np.int32), block_elements, axis=1)


def _centered_codes(x: np.ndarray, encoding: ActivationEncoding) -> np.ndarray:
    return encoding.quantize(x).astype(np.int64) - encoding.zero_points(x)


def _check_fits(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    if acc.size and (acc.min() < info.min or acc.max() > info.max):
        msg = f"the {dtype} accumulator overflows (range {acc.min()}..{acc.max()})"
        raise OverflowError(msg)
    return acc.astype(dtype)


def epilogue(
    acc: np.ndarray,
    input_scale: np.ndarray,
    s: np.ndarray,
    bias: np.ndarray | None,
    channel_axis: int,
    output_encoding: ActivationEncoding | None = None,
    pre_bias_encoding: ActivationEncoding | None = None,
) -> np.ndarray:
    """``float32(acc) · sx · s[c] (+ bias[c])``, then the optional output requantization
    (with ``pre_bias_encoding``, the product is requantized before the bias add too); ``input_scale``
    ``sx`` a float32, or one per row (``[..., 1]``)."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    y = acc.astype(np.float32) * input_scale
    y = y * s.astype(np.float32).reshape(shape)
    if output_encoding is not None and pre_bias_encoding is not None:
        y = pre_bias_encoding.dequantize(pre_bias_encoding.quantize(y))
    if bias is not None:
        y = y + bias.astype(np.float32).reshape(shape)
    if output_encoding is not None:
        y = output_encoding.dequantize(output_encoding.quantize(y))
    return y


def dense_int(
    x: np.ndarray,
    weight: np.ndarray,
    s: np.ndarray,
    input_encoding: ActivationEncoding,
    bias: np.ndarray | None = None,
    output_encoding: ActivationEncoding | None = None,
    pre_bias_encoding: ActivationEncoding | None = None,
) -> np.ndarray:
    """``x [..., K]`` times the int weight ``[N, K]`` (rows = output channels) in integer arithmetic;
    ``input_encoding`` per tensor, or a :class:`~lpbq_tvm.calibration.RowwiseEncoding` (an encoding per row)."""
    codes = _centered_codes(x, input_encoding)
    acc = _check_fits(codes @ weight.astype(np.int64).T, accumulator_dtype(input_encoding))
    return epilogue(acc, input_encoding.scales(x), s, bias, -1, output_encoding, pre_bias_encoding)


def conv_int(
    x: np.ndarray,
    weight: np.ndarray,
    s: np.ndarray,
    input_encoding: ActivationEncoding,
    bias: np.ndarray | None = None,
    output_encoding: ActivationEncoding | None = None,
    *,
    strides: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> np.ndarray:
    """N-d convolution (NC[D]HW, weight ``[O, I/groups, *kernel]`` int) in integer arithmetic.

    ``padding`` lists the leading pads of every spatial axis, then the trailing ones (Relax order).
    """
    if not isinstance(input_encoding, ActivationEncoding):
        msg = f"a convolution's input takes one encoding per tensor, not {type(input_encoding).__name__}"
        raise TypeError(msg)
    codes = _centered_codes(x, input_encoding)
    spatial = x.ndim - 2
    pads = [(0, 0), (0, 0)] + [(padding[i], padding[i + spatial]) for i in range(spatial)]
    padded = np.pad(codes, pads)  # the code of 0.0 is the zero point: centred, it is 0
    kernel = weight.shape[2:]
    window = [(size - 1) * d + 1 for size, d in zip(kernel, dilation, strict=True)]
    patches = np.lib.stride_tricks.sliding_window_view(padded, window, axis=tuple(range(2, x.ndim)))
    patches = patches[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)]
    patches = patches[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
    # patches: [N, C, *out, *kernel]
    batch, channels = x.shape[:2]
    out_spatial = patches.shape[2 : 2 + spatial]
    per_group = channels // groups
    out_channels = weight.shape[0]
    acc = np.empty((batch, out_channels, *out_spatial), dtype=np.int64)
    for group in range(groups):
        group_patches = patches[:, group * per_group : (group + 1) * per_group]
        group_weight = weight[group * out_channels // groups : (group + 1) * out_channels // groups].astype(np.int64)
        # contract over input channels and kernel positions
        moved = np.moveaxis(group_patches, 1, 1 + spatial)  # [N, *out, C/g, *kernel]
        flat = moved.reshape(batch, *out_spatial, -1)
        result = flat @ group_weight.reshape(group_weight.shape[0], -1).T  # [N, *out, O/g]
        acc[:, group * out_channels // groups : (group + 1) * out_channels // groups] = np.moveaxis(result, -1, 1)
    acc = _check_fits(acc, accumulator_dtype(input_encoding))
    return epilogue(acc, input_encoding.scales(x), s, bias, 1, output_encoding)
