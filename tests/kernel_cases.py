"""What the kernel tests of every family share: the references, odd shapes, weights and activations.

weight-only: within float-reassociation tolerance of a float64 reference;
W4A8 / W4A16: bit-exact (np.array_equal on the int32 views of the float32 outputs) against numpy.
"""

from __future__ import annotations

import numpy as np

from lpbq_tvm import reference
from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding

# (N, K, B): channels below and above one 64-channel tile, one and three blocks of 32, 64 and 128.
SHAPES = [(N, nb * B, B) for N in (48, 100) for B in (32, 64, 128) for nb in (1, 3)]


def reference_weight_only(x, q, k, s, B, bias=None):
    """float64 reference ``s[n] · Σ_i x · q · k (+ bias)``; q [N, K], k [N, nb]."""
    w = q.astype(np.float64) * np.repeat(k, B, axis=1)
    y = (x.astype(np.float64) @ w.T) * s.astype(np.float64)
    return y if bias is None else y + bias.astype(np.float64)


def reference_w4a8(x, q, k, s, B, sx, zx, bias=None, bitwidth=8):
    """The project's integer reference (lpbq_tvm.reference) for a ``bitwidth`` input encoding (sx, zx)."""
    encoding = ActivationEncoding(bitwidth, float(np.float32(sx)), -int(zx))
    return reference.dense_int(x, reference.int_weight(q, k, B), s, encoding, bias)


def reference_rowwise(x, q, k, s, B, bias=None):
    """The project's integer reference for mode w4a8-dynamic: an encoding per row of ``x``."""
    return reference.dense_int(x, reference.int_weight(q, k, B), s, RowwiseEncoding(), bias)


def rowwise_activations(M, K, rng):
    """Rows whose magnitudes span 1e-3..1e3 (one encoding could not serve them) and, as far as M reaches, a
    row of zeros, one of positive values only (zero point 0) and one of negative values only (255)."""
    x = (rng.standard_normal((M, K)) * 10.0 ** (np.arange(M) % 7 - 3)[:, None]).astype(np.float32)
    for row, sign in zip(range(1, M), (0, 1, -1), strict=False):  # (as far as M reaches)
        x[row] = sign * np.abs(x[row])
    return x


def weights(N, K, B, rng, edge=True):
    """Random q in -8..7, k in 1..16; a few rows at the extremes (q = -8 & k = 16, q = 7, q = 0)."""
    q = rng.integers(-8, 8, (N, K))
    k = rng.integers(1, 17, (N, K // B))
    if edge:
        q[0], k[0] = -8, 16
        q[1 % N], k[1 % N] = 7, 16
        q[2 % N] = 0
        q[-1, ::2], k[-1] = -8, 1
    return q, k


def weight_only_tolerance(x, q, k, s, B, bias):
    """(K + nb + 3) · 2^-24 · (Σ|x||w|·|s| + |bias|): float32 reassociation + the scale / bias roundings."""
    K = x.shape[1]
    w = np.abs(q).astype(np.float64) * np.repeat(k, B, axis=1)
    mag = (np.abs(x).astype(np.float64) @ w.T) * np.abs(s)
    if bias is not None:
        mag = mag + np.abs(bias)
    return (K + K // B + 3) * 2.0**-24 * mag


def activations(M, K, sx, zx, rng, qmax=255):
    """Normal values plus saturating ones (far outside [−zx·sx, (qmax − zx)·sx]) and exact .5 ties."""
    x = (rng.standard_normal((M, K)) * 60 * sx * qmax / 255).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    third = flat.size // 3
    flat[idx[:third:2]] = 40 * qmax * sx  # saturates at qmax
    flat[idx[1:third:2]] = -40 * qmax * sx  # saturates at 0
    ties = np.float32(sx) * (rng.integers(-200, 200, third).astype(np.float32) + np.float32(0.5))
    flat[idx[third : 2 * third]] = ties  # x / sx lands exactly on a .5 tie when sx is a power of two
    return x
