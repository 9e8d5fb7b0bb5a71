"""The x86 weight layouts: the repacked arrays hold exactly the documented bytes."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import weights
from x86_cases import TARGET

from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.kernels.x86.tuning import tuning
from lpbq_tvm.packing import pack_nibbles

TUNING = tuning(TARGET)


@pytest.mark.parametrize("N, K, B", [(48, 32, 32), (100, 192, 64), (130, 128, 128)])
def test_repack_layouts(N, K, B):
    """The repacked arrays hold exactly the documented bytes (decoded back here by hand)."""
    rng = np.random.default_rng(0)
    q, k = weights(N, K, B, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)
    nt, nb = -(-N // 64), K // B

    qw, kw = fk.repack_weight_only(qp, kp, N, K, B)
    assert qw.dtype == np.uint32 and qw.shape == (nt, K // 8, 64)
    assert kw.dtype == np.uint8 and kw.shape == (nt, -(-nb // 2), 64)
    for n in (0, N // 2, N - 1):
        t, lane = divmod(n, 64)
        nib = (qw[t, :, lane][:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15  # [K/8, 8]
        assert np.array_equal(np.where(nib >= 8, nib.astype(int) - 16, nib).reshape(-1), q[n])
        knib = np.stack([kw[t, :, lane] & 15, kw[t, :, lane] >> 4], 1).reshape(-1)[:nb]
        assert np.array_equal(knib.astype(int) + 1, k[n])
    if N % 64:  # padded channels: code 0, k = 1
        assert not qw[-1, :, N % 64 :].any() and not kw[-1, :, N % 64 :].any()

    qw8, kw8, wsum = fk.repack_w4a8(qp, kp, N, K, B)
    assert qw8.dtype == np.uint32 and qw8.shape == (nt, K // 8, 64)
    assert np.array_equal(kw8, kw)
    assert np.array_equal(wsum, (q * np.repeat(k, B, axis=1)).sum(1))
    for n in (0, N - 1):
        t, lane = divmod(n, 64)
        b = np.ascontiguousarray(qw8[t, :, lane]).view("<u1").reshape(K // 8, 4)  # byte j of dword g
        lo, hi = (b & 15).astype(int) - 8, (b >> 4).astype(int) - 8
        assert np.array_equal(np.concatenate([lo, hi], 1).reshape(-1), q[n])  # k = 8g+j | 8g+4+j
    if N % 64:
        assert (qw8[-1, :, N % 64 :] == 0x88888888).all()
