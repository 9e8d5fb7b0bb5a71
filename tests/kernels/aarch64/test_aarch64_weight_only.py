"""The aarch64 weight-only kernel (GEMV at one row, GEMM above): within float32 reassociation of a float64
reference on the emulated arm64_session, over the odd-shape matrix."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import SHAPES, reference_weight_only, weight_only_tolerance, weights

from lpbq_tvm.kernels.aarch64 import weight_only_dense
from lpbq_tvm.kernels.tiled.repack import repack_weight_only
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.targets import get_target

TARGET = get_target("aarch64").tvm_target()
pytestmark = pytest.mark.xdist_group("arm64-device")


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_weight_only_kernel_on_the_board(arm64_session, M, N, K, B):
    rng = np.random.default_rng(M * 11 + N + K + B)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if (M + N + K // B) % 2 else None
    qw, kw = repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    func = weight_only_dense(M, N, K, B, bias is not None, target=TARGET)
    got = arm64_session.call(func, TARGET, [x, qw, kw, s, *([bias] if bias is not None else [])], (M, N))
    expected = reference_weight_only(x, q, k, s, B, bias)
    tolerance = weight_only_tolerance(x, q, k, s, B, bias)
    assert (np.abs(got - expected) <= tolerance).all(), np.abs(got - expected).max()
