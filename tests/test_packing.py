"""Packed 4-bit storage: the documented byte layout, exact round trips and the size formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.packing import bits_per_weight, pack, pack_nibbles, packed_nbytes, unpack, unpack_nibbles


def test_docstring_example_bytes():
    """q [-8, 7, 1] -> [0x78, 0x01] and k [16, 1, 3] -> [0x0F, 0x02], low nibble first."""
    np.testing.assert_array_equal(pack_nibbles(np.array([-8, 7, 1])), [0x78, 0x01])
    np.testing.assert_array_equal(pack_nibbles(np.array([16, 1, 3]) - 1), [0x0F, 0x02])


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=st.integers(-8, 7)))
def test_nibble_round_trip(values):
    packed = pack_nibbles(values)
    assert packed.dtype == np.uint8 and packed.shape[-1] == (values.shape[-1] + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, values.shape[-1], signed=True), values)


def test_nibble_range_checked():
    with pytest.raises(ValueError, match=r"nibble values must lie in -8\.\.15, got -9\.\.0"):
        pack_nibbles(np.array([-9, 0]))


@settings(max_examples=100, deadline=None)
@given(
    layout=st.sampled_from(
        [((32, 128), 0, 1), ((128, 48), 1, 0), ((2, 64, 24), 2, 1), ((16, 32, 3, 3), 0, 1), ((6, 33, 5), 0, 1)]
    ),
    block_size=st.sampled_from([1, 3, 16, 32]),
    decompressed_bw=st.integers(4, 8),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_identity(layout, block_size, decompressed_bw, seed):
    """unpack(pack(enc)) gives back q, k and float32(s) exactly, and the byte size formula holds."""
    shape, channel_axis, block_axis = layout
    if shape[block_axis] % block_size:
        block_size = 1
    weight = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    enc = encode_lpbq(weight, channel_axis, block_axis, block_size=block_size, decompressed_bw=decompressed_bw)
    packed = pack(enc)
    q, k, s = unpack(packed)
    np.testing.assert_array_equal(q, enc.canonical_int_weight())
    np.testing.assert_array_equal(k, enc.per_block_int_scale)
    np.testing.assert_array_equal(s, enc.per_channel_scale.astype(np.float32))
    channels = shape[channel_axis]
    length = weight.size // channels
    blocks = shape[block_axis] // block_size
    expected = channels * ((length + 1) // 2 + (blocks + 1) // 2 + 4)
    assert packed.nbytes == expected == packed_nbytes(shape, channel_axis, block_axis, block_size)


def test_canonical_view_of_conv_keeps_blocks_contiguous():
    """Conv [C, I, kh, kw]: row c of the canonical view is q[c] flattened, I outermost."""
    weight = np.random.default_rng(3).standard_normal((4, 8, 3, 3)).astype(np.float32)
    enc = encode_lpbq(weight, 0, 1, block_size=4)
    np.testing.assert_array_equal(enc.canonical_int_weight(), enc.int_weight.reshape(4, -1))


def test_bits_per_weight_at_4096():
    """The DESIGN figure: 4.07 bits per weight at K = N = 4096, block size 64."""
    enc = encode_lpbq(np.ones((256, 4096), dtype=np.float32), 0, 1)  # rows scale the same way as 4096
    assert bits_per_weight(enc) == pytest.approx(8 * (2048 + 32 + 4) / 4096)
    assert round(bits_per_weight(enc), 2) == 4.07


@pytest.mark.parametrize("shape", [(16, 96), (8, 24, 3, 3)])
def test_int8_per_channel_codes_are_bytes(shape):
    """8-bit codes (int8 per channel: k = 1, one block) are stored one int8 per byte and read back."""
    weight = np.random.default_rng(1).standard_t(3, shape).astype(np.float32)
    enc = encode_lpbq(weight, 0, 1, bitwidth=8, decompressed_bw=8, block_size=shape[1])
    packed = pack(enc)
    length = int(np.prod(shape[1:]))
    assert packed.code_bits == 8 and packed.q.shape == (shape[0], length) and packed.q.dtype == np.uint8
    q, k, s = unpack(packed)
    np.testing.assert_array_equal(q, enc.canonical_int_weight())
    assert q.min() == -128 and np.all(k == 1)
    assert packed.nbytes == packed_nbytes(shape, 0, 1, shape[1], 8) == shape[0] * (length + 1 + 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bitwidth": 3, "decompressed_bw": 8}, r"packed storage holds k <= 16, got bitwidth 3"),
        ({"decompressed_bw": 9}, r"got bitwidth 4, decompressed_bw 9"),
        ({"block_grouping": 1}, r"one float scale per channel; block_grouping 1 gives 2"),
    ],
)
def test_unpackable_encodings_refused(kwargs, message):
    enc = encode_lpbq(np.ones((2, 128), dtype=np.float32), 0, 1, **kwargs)
    with pytest.raises(ValueError, match=message):
        pack(enc)
