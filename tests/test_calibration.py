"""Activation encodings: AIMET's asymmetric rule, min/max and percentile observers."""

from __future__ import annotations

import numpy as np
import pytest

from lpbq_tvm.calibration import ActivationEncoding, RangeObserver, activation_encoding


def test_worked_example_from_the_docstring():
    encoding = activation_encoding(-1.0, 3.0, 8)
    assert encoding == ActivationEncoding(8, float(np.float32(4 / 255)), -64)
    np.testing.assert_array_equal(encoding.quantize(np.array([0.0, 3.0, -1.0, 100.0, -100.0])), [64, 255, 0, 255, 0])
    assert encoding.quantize(np.zeros(1)).dtype == np.uint8
    assert encoding.dequantize(np.array([64], np.uint8))[0] == 0.0  # zero is exact


def test_range_is_extended_to_include_zero():
    assert activation_encoding(0.5, 2.0, 8) == activation_encoding(0.0, 2.0, 8)
    positive = activation_encoding(0.5, 2.0, 8)
    assert positive.offset == 0 and positive.zero_point == 0
    negative = activation_encoding(-3.0, -1.0, 16)
    assert negative.zero_point == 65535 and negative.dtype == "uint16"


def test_rounding_is_half_to_even():
    encoding = ActivationEncoding(8, 1.0, 0)
    np.testing.assert_array_equal(encoding.quantize(np.array([0.5, 1.5, 2.5])), [0, 2, 2])


def test_constant_zero_tensor_gets_a_valid_scale():
    encoding = activation_encoding(0.0, 0.0, 8)
    assert encoding.scale > 0 and encoding.quantize(np.zeros(3)).tolist() == [0, 0, 0]


def test_minmax_observer_over_batches_equals_hand_computed():
    observer = RangeObserver("minmax")
    batches = [np.array([[0.5, -0.25]]), np.array([[2.0, 1.0]]), np.array([[-0.75, 0.0]])]
    for batch in batches:
        observer.update(batch)
    assert observer.range() == (-0.75, 2.0)
    scale = np.float32(2.75 / 255)
    assert observer.encoding(8) == ActivationEncoding(8, float(scale), int(np.round(-0.75 / float(scale))))


def test_percentile_clips_an_outlier():
    values = np.concatenate([np.linspace(-1, 1, 100_001), [50.0]])
    minmax, percentile = RangeObserver("minmax"), RangeObserver("percentile", 99.9)
    for observer in (minmax, percentile):
        observer.update(values)
    assert minmax.range() == (-1.0, 50.0)
    low, high = percentile.range()
    assert low == pytest.approx(-0.998, abs=1e-3) and high == pytest.approx(0.998, abs=1e-3)
    assert percentile.encoding(8).scale < minmax.encoding(8).scale / 20


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: activation_encoding(0, 1, 4), "activation bitwidth must be 8 or 16, got 4"),
        (lambda: activation_encoding(0, np.inf, 8), r"activation range \[0, inf\] is not finite"),
        (lambda: RangeObserver("entropy"), "unknown calibration method 'entropy'; known: minmax, percentile"),
        (lambda: RangeObserver("percentile", 40), r"percentile must lie in \(50, 100\], got 40"),
        (lambda: RangeObserver().range(), "no calibration data reached this tensor"),
        (lambda: RangeObserver().update(np.array([np.nan])), "non-finite activations"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
