"""The numpy LPBQ encoder: bit-exact golden vectors, properties over random weights, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpbq_tvm.encoder import LPBQConfig, encode_lpbq, sqnr_db, weight_axes


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bit pattern of a float array, so that equality is bitwise."""
    return array.view(np.int64 if array.dtype == np.float64 else np.int32)


def _encode_golden(meta: dict, weight: np.ndarray):
    settings = ("bitwidth", "decompressed_bw", "block_size", "block_grouping")
    return encode_lpbq(weight, meta["channel_axis"], meta["block_axis"], **{key: meta[key] for key in settings})


def test_golden_vectors_bit_exact(golden_case, load_golden):
    """Every array of a golden case is reproduced exactly: integers equal, floats bitwise."""
    meta, expected = load_golden(golden_case)
    encoding = _encode_golden(meta, expected["weight"])
    assert encoding.per_channel_scale.dtype == np.float64
    assert encoding.lpbq_scale.dtype == np.float64
    assert encoding.per_block_int_scale.dtype == np.int32
    assert encoding.qdq_weight.dtype == np.float32
    np.testing.assert_array_equal(_bits(encoding.per_channel_scale), _bits(expected["per_channel_scale"]))
    np.testing.assert_array_equal(encoding.per_block_int_scale, expected["per_block_int_scale"])
    np.testing.assert_array_equal(_bits(encoding.lpbq_scale), _bits(expected["lpbq_scale"]))
    np.testing.assert_array_equal(_bits(encoding.qdq_weight), _bits(expected["qdq_weight"]))
    np.testing.assert_array_equal(encoding.int_weight, expected["int_weight"])


def test_worked_example_by_hand():
    """One 2x4 weight, block size 2, whose encoding is computed by hand."""
    weight = np.array([[0.7, -0.1, 0.07, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    encoding = encode_lpbq(weight, 0, 1, block_size=2)
    # Row 0: deltas max(0.7/7, 0.1/8) = 0.1 and 0.07/7 = 0.01 -> s = 0.1/16, k = [16, round(1.6)=2].
    assert encoding.per_channel_scale[0] == np.float64(np.float32(0.7)) / 7 / 16
    np.testing.assert_array_equal(encoding.per_block_int_scale, [[16, 2], [16, 16]])
    np.testing.assert_array_equal(encoding.int_weight, [[7, -1, 6, 0], [0, 0, 0, 0]])


def test_k_ties_round_half_to_even():
    """k = delta/s exactly 2.5 rounds to 2 (half to even), 3.5 to 4."""
    # Row deltas 16/7 (max), 2.5/7 and 3.5/7 with s = (16/7)/16 = 1/7: ratios 16, 2.5, 3.5.
    weight = np.array([[16.0, 0.0, 2.5, 0.0, 3.5, 0.0]], dtype=np.float32)
    encoding = encode_lpbq(weight, 0, 1, block_size=2)
    np.testing.assert_array_equal(encoding.per_block_int_scale, [[16, 2, 4]])


def test_q_ties_round_half_away_from_zero_after_shift():
    """w/scale = -7.5 shifts to 0.5 and rounds up to 1, i.e. q = -7 (not -8 as half-to-even on -7.5 would)."""
    weight = np.array([[7.0, -7.5]], dtype=np.float32)  # delta = max(7/7, 7.5/8) = 1, s = 1/16, k = 16
    encoding = encode_lpbq(weight, 0, 1, block_size=2)
    np.testing.assert_array_equal(encoding.int_weight, [[7, -7]])


@st.composite
def lpbq_problems(draw):
    """A weight (of one of several distributions), axes and an LPBQ configuration."""
    ndim = draw(st.integers(2, 4))
    channel_axis, block_axis = draw(st.permutations(range(ndim)))[:2]
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    num_blocks = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[channel_axis] = draw(st.integers(1, 6))
    shape[block_axis] = block_size * num_blocks
    grouping = draw(st.sampled_from([-1] + [g for g in range(1, num_blocks + 1) if num_blocks % g == 0]))
    bitwidth = draw(st.integers(2, 8))
    decompressed_bw = draw(st.integers(bitwidth, min(16, bitwidth + 8)))
    distribution = draw(st.sampled_from(["gauss", "student_t", "zeros", "tiny", "one_signed", "outlier", "ties"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-6, 3))
    values = {
        "gauss": lambda: rng.standard_normal(shape) * scale,
        "student_t": lambda: rng.standard_t(3, shape) * scale,
        "zeros": lambda: np.where(rng.random(shape) < 0.7, 0.0, rng.standard_normal(shape)),
        "tiny": lambda: rng.standard_normal(shape) * 1e-9,
        "one_signed": lambda: np.abs(rng.standard_normal(shape)) * scale,
        "outlier": lambda: rng.standard_normal(shape) * np.where(rng.random(shape) < 0.05, 1e3, 1.0),
        "ties": lambda: rng.integers(-16, 16, shape) * 0.5 * scale,
    }[distribution]()
    weight = np.asarray(values, dtype=np.float32)
    config = LPBQConfig(bitwidth, decompressed_bw, block_size, grouping)
    return weight, channel_axis, block_axis, config


@settings(max_examples=300, deadline=None)
@given(lpbq_problems())
def test_encoding_properties(problem):
    """k in range and maximal once per scale group; q in range; error within half a step inside the range."""
    weight, channel_axis, block_axis, config = problem
    enc = encode_lpbq(weight, channel_axis, block_axis, **config.as_dict())
    channels, blocks = weight.shape[channel_axis], weight.shape[block_axis] // config.block_size

    k = enc.per_block_int_scale
    assert k.shape == (channels, blocks)
    assert k.min() >= 1 and k.max() <= config.max_int_scale
    group = blocks if config.block_grouping == -1 else config.block_grouping
    assert (k.reshape(channels, -1, group).max(axis=2) == config.max_int_scale).all()
    np.testing.assert_array_equal(enc.lpbq_scale, k * np.repeat(enc.float_scale, group, axis=1))

    q = enc.int_weight
    assert q.shape == weight.shape and enc.qdq_weight.shape == weight.shape
    assert q.min() >= -(1 << (config.bitwidth - 1)) and q.max() <= (1 << (config.bitwidth - 1)) - 1

    # Broadcast the float32 block scale to the weight layout.
    block_scale = np.repeat(enc.lpbq_scale.astype(np.float32), config.block_size, axis=1)
    block_scale = np.moveaxis(
        block_scale.reshape(block_scale.shape + (1,) * (weight.ndim - 2)), (0, 1), (channel_axis, block_axis)
    )
    block_scale = np.broadcast_to(block_scale, weight.shape)
    np.testing.assert_array_equal(enc.qdq_weight, (q * block_scale).astype(np.float32))
    low = -(1 << (config.bitwidth - 1)) * block_scale.astype(np.float64)
    high = ((1 << (config.bitwidth - 1)) - 1) * block_scale.astype(np.float64)
    inside = (weight >= low) & (weight <= high)
    # Half a step, plus float32 rounding of w/scale + shift (< 2**-18 steps at |t| < 2**(bw)),
    # plus the rounding of the product scale * q (half an ulp of the result).
    bound = block_scale.astype(np.float64) * (0.5 + 2.0**-15) + np.spacing(np.abs(enc.qdq_weight))
    error = np.abs(weight.astype(np.float64) - enc.qdq_weight)
    assert (error[inside] <= bound[inside]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"block_size": 48},
            r"conv: weight shape \(8, 64, 3, 3\): input-channel length 64 along block axis 1 "
            r"is not divisible by block_size 48",
        ),
        ({"block_size": 0}, r"block_size must be positive, got 0"),
        ({"block_size": -4}, r"block_size must be positive, got -4"),
        ({"decompressed_bw": 3}, r"decompressed_bw 3 must lie in bitwidth \(4\) \.\. 16"),
        ({"bitwidth": 1}, r"unsupported bitwidth 1: LPBQ supports 2\.\.8"),
        ({"bitwidth": 9, "decompressed_bw": 16}, r"unsupported bitwidth 9"),
        (
            {"block_size": 16, "block_grouping": 3},
            r"conv: weight shape \(8, 64, 3, 3\): block_grouping 3 does not "
            r"divide the 4 blocks of block_size 16 along block axis 1",
        ),
        ({"block_grouping": 0}, r"block_grouping must be -1 .* got 0"),
    ],
)
def test_validation_errors(kwargs, message):
    weight = np.ones((8, 64, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        encode_lpbq(weight, 0, 1, name="conv", **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_rejected(bad):
    weight = np.ones((4, 64), dtype=np.float32)
    weight[2, 5] = bad
    with pytest.raises(ValueError, match=r"fc: weight shape \(4, 64\) contains non-finite values"):
        encode_lpbq(weight, 0, 1, name="fc")


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ((0, 0), r"channel axis and block axis are both 0 for weight shape \(4, 64\)"),
        ((2, 1), r"channel axis 2 is out of range for a weight of shape \(4, 64\)"),
        ((0, -3), r"block axis -3 is out of range for a weight of shape \(4, 64\)"),
    ],
)
def test_axis_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        encode_lpbq(np.ones((4, 64), dtype=np.float32), *axes)


@pytest.mark.parametrize(
    ("op_type", "ndim", "attributes", "axes"),
    [
        ("Gemm", 2, {"transB": 1}, (0, 1)),
        ("Gemm", 2, {"transB": 0}, (1, 0)),
        ("Gemm", 2, {}, (1, 0)),
        ("MatMul", 2, {}, (1, 0)),
        ("MatMul", 3, {}, (2, 1)),
        ("Conv", 4, {"group": 4}, (0, 1)),
        ("Conv", 3, {}, (0, 1)),
    ],
)
def test_weight_axes(op_type, ndim, attributes, axes):
    assert weight_axes(op_type, ndim, attributes) == axes


def test_weight_axes_unknown_op():
    with pytest.raises(ValueError, match=r"no LPBQ weight layout for op type 'ConvTranspose'"):
        weight_axes("ConvTranspose", 4)


def test_sqnr_matches_definition():
    reference = np.array([3.0, 4.0])
    assert sqnr_db(reference, reference + [0.3, -0.4]) == pytest.approx(20.0)
    assert sqnr_db(reference, reference) == float("inf")


def test_grouping_whole_channel_equals_default():
    """block_grouping equal to the number of blocks is the same as -1."""
    weight = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    default, grouped = encode_lpbq(weight, 0, 1), encode_lpbq(weight, 0, 1, block_grouping=2)
    np.testing.assert_array_equal(default.qdq_weight, grouped.qdq_weight)
    np.testing.assert_array_equal(default.per_block_int_scale, grouped.per_block_int_scale)


def test_per_channel_scale_refused_with_groups():
    encoding = encode_lpbq(np.ones((2, 128), dtype=np.float32), 0, 1, block_grouping=1)
    assert encoding.float_scale.shape == (2, 2)
    with pytest.raises(ValueError, match="block_grouping 1 gives 2 float scales per channel"):
        _ = encoding.per_channel_scale


def test_expanded_int_weight_is_q_times_k_in_the_weight_layout():
    weight = np.random.default_rng(4).standard_normal((64, 12)).astype(np.float32)  # MatMul [in, out]
    enc = encode_lpbq(weight, 1, 0, block_size=16)
    expected = enc.int_weight.astype(np.int32) * np.repeat(enc.per_block_int_scale.T, 16, axis=0)
    np.testing.assert_array_equal(enc.expanded_int_weight(), expected)
    assert enc.expanded_int_weight().min() >= -128 and enc.expanded_int_weight().max() <= 112
