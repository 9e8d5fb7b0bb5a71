"""The numpy integer reference agrees with the same arithmetic done in float64 on dequantized values."""

from __future__ import annotations

import numpy as np
import pytest

from lpbq_tvm import reference
from lpbq_tvm.calibration import activation_encoding


def _float64_conv(x, w, strides, padding, dilation, groups):
    """Direct convolution in float64 (loops), independent of the reference's im2col."""
    batch, channels, *size = x.shape
    spatial = len(size)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(padding[i], padding[i + spatial]) for i in range(spatial)])
    out_channels, per_group, *kernel = w.shape
    out_size = [(padded.shape[2 + i] - (kernel[i] - 1) * dilation[i] - 1) // strides[i] + 1 for i in range(spatial)]
    y = np.zeros((batch, out_channels, *out_size))
    for o in range(out_channels):
        group = o // (out_channels // groups)
        for position in np.ndindex(*out_size):
            for offset in np.ndindex(*kernel):
                index = tuple(position[i] * strides[i] + offset[i] * dilation[i] for i in range(spatial))
                patch = padded[(slice(None), slice(group * per_group, (group + 1) * per_group), *index)]
                y[(slice(None), o, *position)] += patch @ w[(o, slice(None), *offset)]
    return y


@pytest.mark.parametrize("bits", [8, 16])
def test_dense_matches_float64_on_dequantized_values(bits):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    weight = rng.integers(-128, 113, (8, 64))
    s = (rng.random(8) * 0.01 + 1e-3).astype(np.float32)
    encoding = activation_encoding(-2.0, 2.5, bits)
    y = reference.dense_int(x, weight, s, encoding)
    codes = encoding.quantize(x).astype(np.float64) - encoding.zero_point
    exact = codes @ weight.T.astype(np.float64) * encoding.scale * s.astype(np.float64)
    np.testing.assert_allclose(y, exact, rtol=4 * 2.0**-24)  # three float32 roundings of an exact integer sum


def test_conv_matches_direct_float64_convolution():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 7, 6)).astype(np.float32)
    weight = rng.integers(-128, 113, (6, 4, 3, 2))
    s = (rng.random(6) * 0.01 + 1e-3).astype(np.float32)
    encoding = activation_encoding(-1.0, 1.5, 8)
    attrs = {"strides": [2, 1], "padding": [1, 0, 2, 1], "dilation": [1, 2], "groups": 2}
    y = reference.conv_int(x, weight, s, encoding, **attrs)
    codes = encoding.quantize(x).astype(np.float64) - encoding.zero_point
    exact = _float64_conv(codes, weight.astype(np.float64), **attrs) * encoding.scale * s[None, :, None, None]
    assert y.shape == exact.shape
    np.testing.assert_allclose(y, exact, rtol=4 * 2.0**-24)


def test_int32_overflow_is_detected_not_wrapped():
    encoding = activation_encoding(0.0, 1.0, 8)
    x = np.ones((1, 70_000), np.float32)  # 255 · 128 · 70000 > 2**31
    with pytest.raises(OverflowError, match="the int32 accumulator overflows"):
        reference.dense_int(x, np.full((1, 70_000), -128), np.ones(1, np.float32), encoding)


def test_requantized_output_lies_on_the_output_grid():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    out = activation_encoding(-3.0, 3.0, 8)
    y = reference.dense_int(
        x,
        rng.integers(-128, 113, (5, 32)),
        np.full(5, 0.01, np.float32),
        activation_encoding(-2.0, 2.0, 8),
        output_encoding=out,
    )
    codes = y / np.float32(out.scale) + out.zero_point
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
