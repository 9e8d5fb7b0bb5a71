"""The lane-pair weight layout the aarch64 GEMV reads: the repacked dwords hold exactly the documented nibbles."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import weights

from lpbq_tvm.kernels.tiled.repack import repack_w4a8, repack_w4a8_lane_pairs
from lpbq_tvm.packing import pack_nibbles


@pytest.mark.parametrize("N, K, B", [(64, 32, 32), (100, 192, 64), (130, 128, 128)])
def test_lane_pairs_hold_channels_i_and_i_plus_32_in_one_byte(N, K, B):
    """Byte j of ``qw[t, g, 32h + i]``: low nibble ``q[64t + i, 8g + 4h + j] + 8``, high nibble the same
    position of channel ``64t + 32 + i`` (decoded back here by hand); padded channels hold q = 0."""
    rng = np.random.default_rng(N)
    q, k = weights(N, K, B, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)
    qw, kw, wsum = repack_w4a8_lane_pairs(qp, kp, N, K, B)
    _, kw_nibbles, wsum_nibbles = repack_w4a8(qp, kp, N, K, B)
    assert qw.dtype == np.uint32 and qw.shape == (-(-N // 64), K // 8, 64)
    assert np.array_equal(kw, kw_nibbles) and np.array_equal(wsum, wsum_nibbles)
    padded = np.full((qw.shape[0] * 64, K), 0)
    padded[:N] = q
    b = np.ascontiguousarray(qw).view("<u1").reshape(qw.shape[0], K // 8, 2, 32, 4)  # [t, g, h, i, j]
    for t in range(qw.shape[0]):
        for half in (0, 1):  # the low nibbles are channels 0..31 of the tile, the high ones 32..63
            nibble = (b[t] >> (4 * half)) & 15  # [g, h, i, j]
            channels = padded[64 * t + 32 * half : 64 * t + 32 * half + 32]  # [i, K]
            assert np.array_equal(nibble.transpose(2, 0, 1, 3).reshape(32, K).astype(int) - 8, channels)
