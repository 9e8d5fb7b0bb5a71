"""Expressions that decode the tiled weight layouts (:mod:`~lpbq_tvm.kernels.tiled.repack`) in a kernel.

They take TE or TIR expressions alike, so the tensor intrinsics' descriptions use them too.
"""

from __future__ import annotations

from tvm import tirx

__all__ = [
    "byte",
    "k_value",
    "lane_pair_bytes",
    "nibbles",
    "signed_bytes",
    "signed_nibble",
    "top_nibble",
    "unsigned_byte",
]

_LOW_NIBBLES = 0x0F0F0F0F


def k_value(kw, t, b, dtype):
    """``k[64t + lane, b]`` from the nibble-packed ``[NT, nbh, 64]`` buffer, as ``dtype`` (a function of lane)."""
    return lambda lane: (((kw[t, b // 2, lane].astype("int32") >> ((b % 2) * 4)) & 15) + 1).astype(dtype)


def signed_nibble(word, h):
    """Nibble ``h`` (0..7, low first) of a uint32 dword as a sign-extended int32."""
    return (word.astype("int32") << (28 - h * 4)) >> 28


def top_nibble(word, h):
    """Nibble ``h`` of a uint32 dword moved to the top 4 bits of an int32: its signed value · 2^28,
    exact in float32. One shift and a mask, where sign-extending (:func:`signed_nibble`) shifts
    twice: cores that run vector shifts on one pipe (Zen 1) decode faster."""
    return tirx.reinterpret("int32", (word << (28 - h * 4).astype("uint32")) & tirx.const(0xF0000000, "uint32"))


def nibbles(word, hh):
    """The W4A8 layout's ``u = q + 8`` of k-positions ``8g + 4hh + j``, in byte j of the dword (0..15 each)."""
    return ((word >> 4) if hh else word) & tirx.const(_LOW_NIBBLES, "uint32")


def byte(dword, j):
    """Signed byte ``j`` of an int32 dword, as int32 (the VNNI second-operand element)."""
    return (dword >> (j * 8)).astype("int8").astype("int32")


def signed_bytes(offset_nibbles):
    """A uint32 dword of four offset-binary nibbles (u = q + 8, one per byte) -> the dword of their
    two's complement bytes q: setting bit 7 and subtracting 8 per byte cannot borrow across bytes
    (0x80 + u − 8 >= 0x78), and clearing bit 7 again (xor) leaves u − 8 modulo 256."""
    high = tirx.const(0x80808080, "uint32")
    return ((offset_nibbles | high) - tirx.const(0x08080808, "uint32")) ^ high


_HIGH_NIBBLES = 0xF0F0F0F0


def lane_pair_bytes(word, s):
    """A lane-pair dword (:mod:`.repack`) as the two dot-product operands: ``s = 0`` the raw bytes
    (``u_lo + 16 u_hi``), ``s = 1`` the bytes masked to their high nibbles (``16 u_hi``)."""
    return tirx.Select(s == 0, word, word & tirx.const(_HIGH_NIBBLES, "uint32"))


def unsigned_byte(dword, j):
    """Unsigned byte ``j`` of a uint32 dword, as int32 (an unsigned dot product's element)."""
    return ((dword >> (j * 8).astype("uint32")) & tirx.const(255, "uint32")).astype("int32")
