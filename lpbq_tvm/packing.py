"""Packed 4-bit storage of an LPBQ weight (docs/design.md §3) and its exact inverse.

Codes of up to 4 bits are stored as nibbles (below); 5- to 8-bit codes, such as an int8
per-channel layer (bitwidth 8, ``k`` = 1, one block per channel), as one int8 byte each
(``q`` ``[C, L]``, ``code_bits`` 8); ``k`` and ``scale`` are stored the same way in both.

The format, per weight of canonical view ``[C, L]`` (channel axis first, then the block axis,
then any remaining axes flattened: ``L = I * R``, a block is ``block_size * R`` consecutive
elements of a row) with ``nb = I / block_size`` blocks:

==========  =====================  ===============================================================
array       dtype / shape          content
==========  =====================  ===============================================================
``q``       uint8 ``[C, ceil(L/2)]``   ``q[c, 2j]`` in bits 0-3 and ``q[c, 2j+1]`` in bits 4-7 of
                                   byte ``j`` (low nibble first), 4-bit two's complement; an odd
                                   ``L`` leaves the last high nibble 0
``k``       uint8 ``[C, ceil(nb/2)]``  ``k - 1`` (0..15 for k in 1..16) in the same nibble order
``scale``   float32 ``[C]``        the per-channel float scale ``s``
==========  =====================  ===============================================================

Example: ``q`` row ``[-8, 7, 1]`` packs to bytes ``[0x78, 0x01]``; ``k`` row ``[16, 1, 3]``
packs to ``[0x0F, 0x02]``. For ``C = K = 4096``, ``block_size = 64`` this is
``4096 * (2048 + 32 + 4)`` bytes = 4.07 bits per weight.

Kernels may re-arrange these bytes for speed; this layout is what is stored and exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from lpbq_tvm.encoder import LPBQEncoding

__all__ = [
    "PackedLPBQ",
    "code_bits",
    "pack",
    "unpack",
    "pack_nibbles",
    "unpack_nibbles",
    "packed_nbytes",
    "bits_per_weight",
]

_NIBBLE_BITS = 4


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack integers in -8..15 along the last axis, two per byte, low nibble first."""
    values = np.asarray(values)
    if values.size and (values.min() < -8 or values.max() > 15):
        msg = f"nibble values must lie in -8..15, got {values.min()}..{values.max()}"
        raise ValueError(msg)
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.shape[-1] % 2:
        pad = [(0, 0)] * (nibbles.ndim - 1) + [(0, 1)]
        nibbles = np.pad(nibbles, pad)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << _NIBBLE_BITS)


def unpack_nibbles(packed: np.ndarray, length: int, *, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``length`` nibbles per row, as int8."""
    packed = np.asarray(packed, dtype=np.uint8)
    nibbles = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    nibbles[..., 0::2] = packed & 0xF
    nibbles[..., 1::2] = packed >> _NIBBLE_BITS
    values = nibbles[..., :length].astype(np.int8)
    if signed:
        values = np.where(values >= 8, values - 16, values).astype(np.int8)
    return values


@dataclass(frozen=True, eq=False)
class PackedLPBQ:
    """One LPBQ weight in packed storage, with what is needed to read it back."""

    q: np.ndarray  # uint8 [C, ceil(L/2)]
    k: np.ndarray  # uint8 [C, ceil(nb/2)], k - 1 per nibble
    scale: np.ndarray  # float32 [C]
    shape: tuple[int, ...]
    channel_axis: int
    block_axis: int
    block_size: int
    code_bits: int = _NIBBLE_BITS  # 4: q as nibbles; 8: q as int8 bytes

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.k.nbytes + self.scale.nbytes

    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_axis] // self.block_size

    @property
    def canonical_length(self) -> int:
        return prod(self.shape) // self.shape[self.channel_axis]


def code_bits(bitwidth: int) -> int:
    """Storage bits per code: 4 (nibbles) up to 4-bit codes, else 8 (bytes)."""
    return _NIBBLE_BITS if bitwidth <= _NIBBLE_BITS else 8


def _check_packable(encoding: LPBQEncoding) -> None:
    if encoding.decompressed_bw - encoding.bitwidth > _NIBBLE_BITS:
        msg = (
            f"packed storage holds k <= 16, got bitwidth {encoding.bitwidth}, "
            f"decompressed_bw {encoding.decompressed_bw} for weight shape {encoding.shape}"
        )
        raise ValueError(msg)
    if encoding.float_scale.shape[1] != 1:
        msg = (
            f"packed storage holds one float scale per channel; block_grouping "
            f"{encoding.block_grouping} gives {encoding.float_scale.shape[1]} for weight shape {encoding.shape}"
        )
        raise ValueError(msg)


def pack(encoding: LPBQEncoding) -> PackedLPBQ:
    """Pack an encoding into the storage format described in the module docstring."""
    _check_packable(encoding)
    bits = code_bits(encoding.bitwidth)
    codes = encoding.canonical_int_weight()
    return PackedLPBQ(
        q=pack_nibbles(codes) if bits == _NIBBLE_BITS else codes.astype(np.int8).view(np.uint8),
        k=pack_nibbles(encoding.per_block_int_scale - 1),
        scale=encoding.per_channel_scale.astype(np.float32),
        shape=encoding.shape,
        channel_axis=encoding.channel_axis,
        block_axis=encoding.block_axis,
        block_size=encoding.block_size,
        code_bits=bits,
    )


def unpack(packed: PackedLPBQ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q [C, L] int8, k [C, nb] int32, s [C] float32)`` from packed storage."""
    if packed.code_bits == _NIBBLE_BITS:
        q = unpack_nibbles(packed.q, packed.canonical_length, signed=True)
    else:
        q = packed.q.view(np.int8)
    k = unpack_nibbles(packed.k, packed.num_blocks, signed=False).astype(np.int32) + 1
    return q, k, packed.scale


def packed_nbytes(
    shape: tuple[int, ...], channel_axis: int, block_axis: int, block_size: int, bitwidth: int = 4
) -> int:
    """Bytes of the packed form: ``C * (ceil(L/2) + ceil(nb/2) + 4)`` (``L`` instead of ``ceil(L/2)``
    for byte codes)."""
    channels = shape[channel_axis]
    length = prod(shape) // channels
    blocks = shape[block_axis] // block_size
    codes = -(-length * code_bits(bitwidth) // 8)
    return channels * (codes + -(-blocks // 2) + 4)


def encoding_nbytes(encoding: LPBQEncoding) -> int:
    """:func:`packed_nbytes` of an encoding's packed form."""
    return packed_nbytes(
        encoding.shape, encoding.channel_axis, encoding.block_axis, encoding.block_size, encoding.bitwidth
    )


def bits_per_weight(encoding: LPBQEncoding) -> float:
    """Storage bits per weight of the packed form (q nibbles, k nibbles and fp32 scales)."""
    return 8.0 * encoding_nbytes(encoding) / prod(encoding.shape)
