"""The aarch64 tensor intrinsics of the LPBQ kernels: one NEON instruction sequence per call, registered by name.

* :func:`udot_nibble_intrinsic` — ``C[4] (int32) += Σ_j A[j] · lo_j(Q[i]) + A[4 + j] · hi_j(Q[i])``, where
  dword ``Q[i]`` (the W4A8 layout of :mod:`lpbq_tvm.kernels.tiled.repack`, read as stored) holds the
  offset-binary nibbles ``u = q + 8`` of channel i: k-position j in the low, 4 + j in the high nibble
  of byte j. One 16-byte load is decoded in registers (``and``, ``ushr`` on bytes) into the two
  operands of two ``udot`` (Armv8.2 dot product, unsigned: codes 0..255 times u 0..15), each with the
  four activation codes of its half broadcast;
* :func:`sdot_halves_intrinsic` — ``C[4] (int32) += Σ_h Σ_j (A[4h + j] − 128) · B[h, i] byte j`` over a
  decoded tile of signed ``q·k`` bytes: the two halves of a k-step as two ``sdot`` by element, the eight
  codes loaded once and made signed by one ``eor`` (the fold-k scheme).
* :func:`usmmla_pair_intrinsic` — ``C[2, 2] (int32) += Σ_k A[i, k] · B[j] byte k`` of the codes of a row
  pair (2 x 8, unsigned) and two lanes of eight signed ``q·k`` bytes each: one ``usmmla`` (i8mm, the
  matrix-multiply scheme).

Tensor intrinsics are registered globally by name: a variant that differs in its code must differ in
its name. Each is registered on first use (the function that names it), not on import: parsing their
TVMScript takes most of a second, which every ``lpbq-tvm`` command would pay.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from lpbq_tvm.kernels.tiled.decode import byte
from lpbq_tvm.kernels.tiled.descriptions import broadcast_codes, lane_pair_dot, nibble_dot

__all__ = [
    "UDOT_LANES",
    "sdot_halves_intrinsic",
    "udot_lane_pair_intrinsic",
    "udot_nibble_intrinsic",
    "usmmla_pair_intrinsic",
]

_UDOT_NIBBLE = "lpbq_udot_4x8_nibbles_neon"
UDOT_LANES = 4  # int32 lanes of one udot (a 128-bit register)
UDOT = "llvm.aarch64.neon.udot.v4i32.v16i8"


def _udot(acc, weights, codes):
    """``acc + udot(weights, codes)``: int32 lanes of four unsigned byte products each."""
    lanes = f"int32x{UDOT_LANES}"
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(UDOT), acc, weights, codes, dtype=lanes)


def _weight_bytes(Q):
    """The ``UDOT_LANES`` dwords ``Q[0:4]`` as 16 bytes."""
    return T.reinterpret(Q.vload([0], f"uint32x{UDOT_LANES}"), dtype=f"uint8x{4 * UDOT_LANES}")


def _signed_codes(A, half: int):
    """The four codes ``A[4 half : 4 half + 4]`` less 128 each (top bits flipped) in every int32 lane: lane
    ``half`` of the eight codes loaded once, which LLVM folds into an ``sdot`` by element."""
    codes = T.bitwise_xor(T.reinterpret(A.vload([0], "uint8x8"), dtype="int32x2"), T.broadcast(T.int32(-2139062144), 2))
    return T.Shuffle([codes, codes], [half] * UDOT_LANES)  # (a shuffle has at most its inputs' lanes)


def udot_nibble_intrinsic() -> str:
    """The nibble scheme's dot product with two ``udot``; registered on first use."""
    if TensorIntrin.get(_UDOT_NIBBLE, allow_missing=True) is not None:
        return _UDOT_NIBBLE
    n = UDOT_LANES

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], Q[0:n])
            T.writes(C[0:n])
            C[T.ramp(T.int32(0), 1, n)] = _udot(
                _udot(
                    C.vload([0], dtype=f"int32x{n}"),
                    T.bitwise_and(_weight_bytes(Q), T.broadcast(T.uint8(15), 4 * n)),  # the low nibbles
                    broadcast_codes(A, 0, n),
                ),
                T.shift_right(_weight_bytes(Q), T.broadcast(T.uint8(4), 4 * n)),  # the high ones
                broadcast_codes(A, 4, n),
            )

    TensorIntrin.register(_UDOT_NIBBLE, nibble_dot(n), impl)
    return _UDOT_NIBBLE


_UDOT_LANE_PAIRS = "lpbq_udot_2x4x4_lane_pairs_neon"
_HIGH_NIBBLES = 0xF0


def udot_lane_pair_intrinsic() -> str:
    """The lane-pair scheme's two dot products of one 16-byte load: ``udot`` of the raw bytes and of the
    bytes masked to their high nibbles (one ``and``), with the same broadcast codes; registered on first use."""
    if TensorIntrin.get(_UDOT_LANE_PAIRS, allow_missing=True) is not None:
        return _UDOT_LANE_PAIRS
    n = UDOT_LANES
    stride = T.int32()

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((2, n), "int32", strides=(stride, 1), offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:n], A[0:4], Q[0:n])
            T.writes(C[0:2, 0:n])
            C[0, T.ramp(T.int32(0), 1, n)] = _udot(
                C.vload([0, 0], dtype=f"int32x{n}"), _weight_bytes(Q), broadcast_codes(A, 0, n)
            )
            C[1, T.ramp(T.int32(0), 1, n)] = _udot(
                C.vload([1, 0], dtype=f"int32x{n}"),
                T.bitwise_and(_weight_bytes(Q), T.broadcast(T.uint8(_HIGH_NIBBLES), 4 * n)),
                broadcast_codes(A, 0, n),
            )

    TensorIntrin.register(_UDOT_LANE_PAIRS, lane_pair_dot(n), impl)
    return _UDOT_LANE_PAIRS


_SDOT_HALVES = "lpbq_sdot_2x4x4_offset_codes_by_lane_neon"
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"


def sdot_halves_intrinsic() -> str:
    """``C[i] += Σ_h Σ_j (A[4h + j] − 128) · signed byte j of B[h, i]``: the two halves of a k-step of the
    fold-k scheme (four lanes of a decoded int8 tile each) as two ``sdot`` by element: the eight codes
    are loaded once and made signed by one ``eor``, and each ``sdot`` takes its half's four from a lane
    of that register (``sdot v.4s, v.16b, v.4b[h]``) — no code broadcast to a register per call.
    Registered on first use."""
    if TensorIntrin.get(_SDOT_HALVES, allow_missing=True) is not None:
        return _SDOT_HALVES
    n = UDOT_LANES
    stride = T.int32()

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        B: T.Buffer((2, n), "int32", strides=(stride, 1), offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], B[0:2, 0:n])
            T.writes(C[0:n])
            for h, i, kk in T.grid(2, n, 4):
                with T.sblock("update"):
                    vi, vh, vk = T.axis.remap("SRR", [i, h, kk])
                    C[vi] = C[vi] + (T.cast(A[4 * vh + vk], "int32") - 128) * byte(B[vh, vi], vk)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        B: T.Buffer((2, n), "int32", strides=(stride, 1), offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], B[0:2, 0:n])
            T.writes(C[0:n])
            C[T.ramp(T.int32(0), 1, n)] = _sdot(
                _sdot(C.vload([0], dtype=f"int32x{n}"), B.vload([0, 0], f"int32x{n}"), _signed_codes(A, 0)),
                B.vload([1, 0], f"int32x{n}"),
                _signed_codes(A, 1),
            )

    TensorIntrin.register(_SDOT_HALVES, desc, impl)
    return _SDOT_HALVES


def _sdot(acc, weights, codes):
    """``acc + sdot(weights, codes)`` over int32 lanes of four signed bytes each."""
    lanes, byte_lanes = f"int32x{UDOT_LANES}", f"int8x{4 * UDOT_LANES}"
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(SDOT),
        acc,
        T.reinterpret(weights, dtype=byte_lanes),
        T.reinterpret(codes, dtype=byte_lanes),
        dtype=lanes,
    )


_USMMLA_PAIR = "lpbq_usmmla_2x2x8_code_pairs_local_neon"
USMMLA = "llvm.aarch64.neon.usmmla.v4i32.v16i8"


def usmmla_pair_intrinsic() -> str:
    """``C[i, j] += Σ_k A[i, k] · signed byte k % 4 of B[j, k // 4]``: one ``usmmla`` (Armv8.6 i8mm) of the
    2 x 8 unsigned codes of a row pair (16 adjacent bytes) and two lanes of a decoded local int8 tile
    whose eight bytes per lane are adjacent (16 bytes): one load each. Registered on first use."""
    if TensorIntrin.get(_USMMLA_PAIR, allow_missing=True) is not None:
        return _USMMLA_PAIR

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2, 8), "uint8", offset_factor=1),
        B: T.Buffer((2, 2), "int32", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:2])
            T.writes(C[0:2, 0:2])
            for i, j, kk in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * byte(B[vj, vk // 4], vk % 4)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2, 8), "uint8", offset_factor=1),
        B: T.Buffer((2, 2), "int32", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:2])
            T.writes(C[0:2, 0:2])
            C[0, T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(USMMLA),
                C.vload([0, 0], dtype="int32x4"),
                A.vload([0, 0], dtype="uint8x16"),
                T.reinterpret(B.vload([0, 0], "int32x4"), dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(_USMMLA_PAIR, desc, impl)
    return _USMMLA_PAIR
