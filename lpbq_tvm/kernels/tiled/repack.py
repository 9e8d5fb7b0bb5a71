"""The tiled weight layouts of the CPU kernels: the canonical packed storage repacked once, at conversion time.

Output channels are tiled by ``LANES = 64`` and padded with zero codes (k = 1). With
``NT = ceil(N / 64)``, ``nb = K / B``, ``nbh = ceil(nb / 2)`` and channel ``n = 64 t + lane``:

* weight-only ``qw`` uint32 ``[NT, K/8, 64]``: ``qw[t, g, lane]`` = bytes ``4g .. 4g+3`` of the
  canonical ``q_packed[n]`` as a little-endian dword, so nibble ``h`` (bits ``4h .. 4h+3``) is
  ``q[n, 8g + h]`` in two's complement — a pure transpose of the canonical bytes;
* W4A8 / W4A16 ``qw`` uint32 ``[NT, K/8, 64]``: byte ``j`` of ``qw[t, g, lane]`` holds
  ``q[n, 8g + j] + 8`` in its low nibble and ``q[n, 8g + 4 + j] + 8`` in its high nibble (offset
  binary, 0..15): masking with 0x0F0F0F0F (or shifting by 4 first) gives the 4-byte ``vpdpbusd``
  operand of channel n directly, 16 channels per 64-byte load; padded channels are 0x88888888 (q = 0);
* W4A8 / W4A16 in *lane pairs* ``qw`` uint32 ``[NT, K/8, 64]``: byte ``j`` of ``qw[t, g, 32h + i]``
  holds ``q[n, 8g + 4h + j] + 8`` of channel ``n = 64t + i`` in its low nibble and that of channel
  ``n + 32`` in its high nibble: the raw byte and the byte masked with 0xF0 are the operands of two
  dot products with the same four activation codes (the lane-pair scheme, :mod:`.lane_pairs`);
* all: ``kw`` uint8 ``[NT, nbh, 64]``: ``kw[t, bh, lane] = k_packed[n, bh]``;
* W4A8 / W4A16 ``wsum`` int32 ``[N]``: ``Σ_i q[n, i] · k[n, i // B]``.

The canonical storage (:mod:`lpbq_tvm.packing`): ``q_packed`` uint8 ``[N, K/2]``, ``q[n, 2j]`` in
the low and ``q[n, 2j+1]`` in the high nibble of byte j, two's complement; ``k_packed`` uint8
``[N, ceil(nb/2)]``, ``k − 1`` nibbles in the same order.
"""

from __future__ import annotations

import numpy as np

from lpbq_tvm.packing import unpack_nibbles

__all__ = ["LANES", "check_shape", "repack_w4a8", "repack_w4a8_lane_pairs", "repack_weight_only"]

LANES = 64  # output channels per tile (innermost in the repacked weights)


def check_shape(N: int, K: int, B: int) -> None:
    """The shapes every x86 kernel takes: whole dwords per block (``B % 8 == 0``), whole blocks per row."""
    if B % 8 or K % B or N < 1:
        msg = f"need B % 8 == 0, K % B == 0 and N >= 1; got N={N}, K={K}, B={B}"
        raise ValueError(msg)


def _codes(q_packed, k_packed, N: int, K: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical packed storage -> (q int32 [N, K] in -8..7, k int32 [N, nb] in 1..16), shapes checked."""
    q_packed, k_packed = np.asarray(q_packed, np.uint8), np.asarray(k_packed, np.uint8)
    nb = K // B
    if q_packed.shape != (N, K // 2) or k_packed.shape != (N, -(-nb // 2)):
        msg = f"expected q [{N}, {K // 2}] and k [{N}, {-(-nb // 2)}], got {q_packed.shape}, {k_packed.shape}"
        raise ValueError(msg)
    q = unpack_nibbles(q_packed, K, signed=True).astype(np.int32)
    return q, unpack_nibbles(k_packed, nb, signed=False).astype(np.int32) + 1


def _tile_channels(a: np.ndarray, N: int, fill: int) -> np.ndarray:
    """[N, ...] -> [NT, 64, ...], channels padded with ``fill``."""
    nt = -(-N // LANES)
    out = np.full((nt * LANES,) + a.shape[1:], fill, dtype=a.dtype)
    out[:N] = a
    return out.reshape((nt, LANES) + a.shape[1:])


def _repack_k(k_packed: np.ndarray, N: int) -> np.ndarray:
    """k_packed [N, nbh] -> [NT, nbh, 64] (padding k - 1 = 0)."""
    return np.ascontiguousarray(_tile_channels(np.asarray(k_packed, np.uint8), N, 0).transpose(0, 2, 1))


def repack_weight_only(q_packed, k_packed, N: int, K: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical storage -> ``(qw uint32 [NT, K/8, 64], kw uint8 [NT, nbh, 64])`` for the weight-only kernel."""
    check_shape(N, K, B)
    _codes(q_packed, k_packed, N, K, B)  # shape checks
    words = np.ascontiguousarray(np.asarray(q_packed, np.uint8)).view("<u4")  # [N, K/8]
    qw = _tile_channels(words, N, 0)  # [NT, 64, K/8], padded channels: q = 0
    return np.ascontiguousarray(qw.transpose(0, 2, 1)), _repack_k(k_packed, N)


def repack_w4a8(q_packed, k_packed, N: int, K: int, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical storage -> ``(qw uint32 [NT, K/8, 64], kw uint8 [NT, nbh, 64], wsum int32 [N])`` for the
    integer kernels."""
    check_shape(N, K, B)
    q, k = _codes(q_packed, k_packed, N, K, B)
    u = (q + 8).astype(np.uint8).reshape(N, K // 8, 2, 4)  # [n, g, half, j]
    byte = u[:, :, 0, :] | (u[:, :, 1, :] << 4)  # [n, g, j]
    qw = _tile_channels(byte, N, 0x88).transpose(0, 2, 1, 3)  # [NT, g, lane, j]
    qw = np.ascontiguousarray(qw).view("<u4").reshape(qw.shape[:3])  # byte j of each dword = k-position j
    return qw, _repack_k(k_packed, N), _wsum(q, k, B)


def repack_w4a8_lane_pairs(q_packed, k_packed, N: int, K: int, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical storage -> ``(qw uint32 [NT, K/8, 64], kw, wsum)``: :func:`repack_w4a8` with the lane-pair ``qw``."""
    check_shape(N, K, B)
    q, k = _codes(q_packed, k_packed, N, K, B)
    u = _tile_channels((q + 8).astype(np.uint8), N, 8)  # [NT, 64, K], padded channels: q = 0
    byte = u[:, : LANES // 2] | (u[:, LANES // 2 :] << 4)  # [NT, 32, K]: channel i low, i + 32 high
    byte = byte.reshape(byte.shape[0], LANES // 2, K // 8, 2, 4).transpose(0, 2, 3, 1, 4)  # [NT, g, h, i, j]
    qw = np.ascontiguousarray(byte).view("<u4").reshape(byte.shape[0], K // 8, LANES)
    return qw, _repack_k(k_packed, N), _wsum(q, k, B)


def _wsum(q: np.ndarray, k: np.ndarray, B: int) -> np.ndarray:
    """``Σ_i q[n, i] · k[n, i // B]`` as int32 ``[N]``."""
    return (q.astype(np.int64) * np.repeat(k, B, axis=1)).sum(axis=1).astype(np.int32)
