"""Per-tensor activation encodings (uint8 / uint16, asymmetric) from calibration data, as AIMET computes them.

An encoding maps a float ``x`` to an unsigned code and back::

    xq = clamp(round_half_even(x / scale) - offset, 0, 2**bw - 1)      # offset <= 0
    x ~= (xq + offset) * scale

From an observed range: ``min`` / ``max`` are extended to include 0, ``scale = (max - min) /
(2**bw - 1)`` (float64, then float32, the precision kernels use), ``offset = round(min / scale)``
(half to even), so 0 is exactly representable. Observers collect the range over every
calibration batch: ``"minmax"`` keeps the extremes, ``"percentile"`` takes the
``100 - p`` / ``p`` percentiles of all values seen (outliers clipped).

Worked example, uint8, observed range [-1, 3]: scale = 4 / 255 = 0.015686275, offset =
round(-63.75) = -64, so 0.0 -> 64, 3.0 -> 255, -1.0 -> 0.

:class:`RowwiseEncoding` is the calibration-free alternative of mode ``w4a8-dynamic``: each row
(token) of a dense layer's input gets its own uint8 encoding at run time, from the row's own range,
in float32 (the arithmetic a kernel repeats): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
``scale = (hi - lo) / 255`` (1 for a row of zeros), ``zero point = clamp(round_half_even(-lo / scale),
0, 255)``. A language model's activations have rows and channels hundreds of times larger than
the rest, which one calibrated per-tensor range cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ActivationEncoding",
    "ChannelEnergyObserver",
    "RangeObserver",
    "RowwiseEncoding",
    "activation_encoding",
    "CALIBRATION_METHODS",
]

CALIBRATION_METHODS = ("minmax", "percentile")
# Smallest range an encoding may span, so that a constant-zero tensor still gets a valid scale.
_MIN_RANGE = 1e-5


@dataclass(frozen=True)
class ActivationEncoding:
    """An asymmetric per-tensor encoding: ``bitwidth``, float32 ``scale`` and QNN-style ``offset <= 0``."""

    bitwidth: int
    scale: float
    offset: int

    @property
    def zero_point(self) -> int:
        return -self.offset

    @property
    def qmax(self) -> int:
        return (1 << self.bitwidth) - 1

    @property
    def dtype(self) -> str:
        return "uint8" if self.bitwidth <= 8 else "uint16"

    def scales(self, x: np.ndarray) -> np.float32:
        """The scale that encodes ``x``: this encoding's, whatever ``x`` holds."""
        return np.float32(self.scale)

    def zero_points(self, x: np.ndarray) -> int:
        """The zero point that encodes ``x``: this encoding's."""
        return self.zero_point

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """``clamp(round_half_even(x / scale) + zero_point, 0, qmax)`` in float32 arithmetic."""
        return _codes(x, self.scales(x), self.zero_points(x), self.qmax, self.dtype)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return ((codes.astype(np.int32) - self.zero_point).astype(np.float32) * np.float32(self.scale)).astype(
            np.float32
        )


@dataclass(frozen=True)
class RowwiseEncoding:
    """uint8 codes per row (the last axis is a row's), encoded at run time from the row's own range, in
    float32 (module docstring): ``scale`` and ``zero point`` per row, shaped ``[..., 1]``."""

    bitwidth = 8
    qmax = 255
    dtype = "uint8"

    def encodings(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's (scale float32, zero point int32)."""
        x = np.asarray(x, np.float32)
        low = np.minimum(np.min(x, axis=-1, keepdims=True), np.float32(0))
        span = (np.maximum(np.max(x, axis=-1, keepdims=True), np.float32(0)) - low).astype(np.float32)
        scale = np.where(span > 0, span / np.float32(self.qmax), np.float32(1)).astype(np.float32)
        return scale, np.clip(np.rint(-low / scale), 0, self.qmax).astype(np.int32)

    def scales(self, x: np.ndarray) -> np.ndarray:
        return self.encodings(x)[0]

    def zero_points(self, x: np.ndarray) -> np.ndarray:
        return self.encodings(x)[1]

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """``clamp(round_half_even(x / scale[row]) + zero_point[row], 0, 255)`` in float32 arithmetic."""
        return _codes(x, *self.encodings(x), self.qmax, self.dtype)


def _codes(x: np.ndarray, scale, zero_point, qmax: int, dtype: str) -> np.ndarray:
    codes = np.rint(np.asarray(x, np.float32) / scale) + np.asarray(zero_point, np.float32)
    return np.clip(codes, 0, qmax).astype(dtype)


def activation_encoding(minimum: float, maximum: float, bitwidth: int) -> ActivationEncoding:
    """The encoding of an observed range; see the module docstring."""
    if bitwidth not in (8, 16):
        msg = f"activation bitwidth must be 8 or 16, got {bitwidth}"
        raise ValueError(msg)
    if not (np.isfinite(minimum) and np.isfinite(maximum)):
        msg = f"activation range [{minimum}, {maximum}] is not finite"
        raise ValueError(msg)
    minimum, maximum = min(float(minimum), 0.0), max(float(maximum), 0.0)
    maximum = max(maximum, minimum + _MIN_RANGE)
    steps = (1 << bitwidth) - 1
    scale = float(np.float32((maximum - minimum) / steps))
    offset = int(np.clip(np.round(minimum / scale), -steps, 0))
    return ActivationEncoding(bitwidth, scale, offset)


class RangeObserver:
    """Collects the range of one tensor over calibration batches."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99) -> None:
        if method not in CALIBRATION_METHODS:
            msg = f"unknown calibration method {method!r}; known: {', '.join(CALIBRATION_METHODS)}"
            raise ValueError(msg)
        if not 50.0 < percentile <= 100.0:
            msg = f"percentile must lie in (50, 100], got {percentile}"
            raise ValueError(msg)
        self.method = method
        self.percentile = percentile
        self._minimum = np.inf
        self._maximum = -np.inf
        self._values: list[np.ndarray] = []

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float32)
        if value.size == 0:
            return
        if not np.isfinite(value).all():
            msg = "calibration data produced non-finite activations"
            raise ValueError(msg)
        self._minimum = min(self._minimum, float(value.min()))
        self._maximum = max(self._maximum, float(value.max()))
        if self.method == "percentile":
            self._values.append(value.ravel())

    @property
    def seen(self) -> bool:
        return self._minimum <= self._maximum

    def range(self) -> tuple[float, float]:
        if not self.seen:
            msg = "no calibration data reached this tensor"
            raise ValueError(msg)
        if self.method == "minmax":
            return self._minimum, self._maximum
        values = np.concatenate(self._values)
        low, high = np.percentile(values, [100.0 - self.percentile, self.percentile])
        return float(low), float(high)

    def encoding(self, bitwidth: int) -> ActivationEncoding:
        return activation_encoding(*self.range(), bitwidth)


class ChannelEnergyObserver:
    """Mean square of a tensor per channel along ``axis`` over calibration batches (for ``mse-act``)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self._sum: np.ndarray | None = None
        self._count = 0

    def update(self, value: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(value, dtype=np.float64), self.axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        squares = np.square(flat).sum(axis=0)
        self._sum = squares if self._sum is None else self._sum + squares
        self._count += flat.shape[0]

    def mean_square(self) -> np.ndarray:
        if self._sum is None:
            raise ValueError("no calibration data reached this tensor")
        return (self._sum / self._count).astype(np.float32)
