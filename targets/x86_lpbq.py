"""Hand-scheduled LPBQ dense kernels for x86 CPUs (AVX-512 / VNNI; AVX2 and plain fallbacks), for the cpu target.

Two kernels, each a scheduled ``tvm.tirx.PrimFunc`` named ``main`` (attrs ``op_pattern = 8``,
``tirx.is_scheduled = True``) that ``tvm.compile`` builds as is and ``relax.call_tir`` can call:

* :func:`weight_only_dense` — ``y[m, n] = s[n] · Σ_i x[m, i] · float(q[n, i] · k[n, i // B]) (+ bias[n])``,
  float32 activations and accumulation; differs from exact arithmetic by float32 rounding only
  (reassociation: per block ``P_b = Σ x · q``, then ``Σ_b P_b · k_b``; codes are decoded signed, so
  there is no offset cancellation and all-zero codes give exactly 0);
* :func:`w4a8_dense` — ``xq = clamp(round_half_even(x / sx) + zx, 0, 255)`` in-kernel (division, not
  a reciprocal), ``acc = Σ_i (xq − zx) · (q · k)`` in int32 (computed as ``Σ xq · w − zx · wsum``),
  ``y = float32(acc) · sx · s[n]``, then ``+ bias[n]`` as a separate loop nest: bit-exact against
  numpy doing the same float32 operations (:func:`lpbq_tvm.reference.dense_int`).

Both read a *repacked* copy of the canonical packed storage of :mod:`lpbq_tvm.packing`
(``q_packed`` uint8 ``[N, K/2]``: ``q[n, 2j]`` low nibble, ``q[n, 2j+1]`` high nibble of byte j,
two's complement; ``k_packed`` uint8 ``[N, ceil(nb/2)]``: ``k − 1`` nibbles in the same order).
The repack runs once at conversion time (:func:`repack_weight_only`, :func:`repack_w4a8`); output
channels are tiled by ``LANES = 64`` and padded with zero codes (k = 1); the kernels write exactly
``[M, N]``. ``s`` and ``bias`` are float32 ``[N]``, passed unchanged. Requires ``B % 8 == 0``.

Layouts (``NT = ceil(N / 64)``, ``nb = K / B``, ``nbh = ceil(nb / 2)``, channel ``n = 64 t + lane``):

* weight-only ``qw`` uint32 ``[NT, K/8, 64]``: ``qw[t, g, lane]`` = bytes ``4g .. 4g+3`` of
  ``q_packed[n]`` as a little-endian dword, so nibble ``h`` (bits ``4h .. 4h+3``) is ``q[n, 8g + h]``
  in two's complement — a pure transpose of the canonical bytes;
* W4A8 ``qw`` uint32 ``[NT, K/8, 64]``: byte ``j`` of ``qw[t, g, lane]`` holds ``q[n, 8g + j] + 8`` in
  its low nibble and ``q[n, 8g + 4 + j] + 8`` in its high nibble (offset binary, 0..15): masking
  with 0x0F0F0F0F (or shifting by 4 first) gives the 4-byte ``vpdpbusd`` operand of channel n
  directly, 16 channels per 64-byte load; padded channels are 0x88888888 (q = 0);
* both: ``kw`` uint8 ``[NT, nbh, 64]``: ``kw[t, bh, lane] = k_packed[n, bh]``;
* W4A8 ``wsum`` int32 ``[N]``: ``Σ_i q[n, i] · k[n, i // B]``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

__all__ = [
    "LANES",
    "default_target",
    "repack_weight_only",
    "repack_w4a8",
    "weight_only_dense",
    "w4a8_dense",
    "w4a16_dense",
    "VNNI_INTRIN",
    "VNNI_NIBBLE_INTRIN",
    "AVX512_NIBBLE_INTRIN",
    "LUT_INTRIN",
]

LANES = 64  # output channels per tile (innermost in the repacked weights)


def default_target() -> tvm.target.Target:
    """The host CPU target of :mod:`lpbq_tvm.targets.cpu`."""
    from lpbq_tvm.targets.cpu import tvm_target

    return tvm_target()


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
AVX512_NIBBLE_INTRIN = "lpbq_dot_16x8_nibbles_avx512"
_NIBBLE_INTRINSICS = {"vnni": VNNI_NIBBLE_INTRIN, "avx512bw": AVX512_NIBBLE_INTRIN}


def _make_nibble_intrinsics():
    # C[16] += Σ_j A[j] · u_lo[i, j] + A[4 + j] · u_hi[i, j], where dword Q[i] (read straight from the
    # weights) holds u_lo[i, j] in the low and u_hi[i, j] in the high nibble of byte j: the decode
    # (and, shift, and) happens in registers, two dot-product instructions per 64-byte load.
    mask = 0x0F0F0F0F

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((16,), "uint32", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:8], Q[0:16])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for kk in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + (
                            T.cast(A[vk], "int32")
                            * T.cast(
                                T.cast(T.cast(T.bitwise_and(Q[vi], T.uint32(mask)), "int32") >> vk * 8, "int8"), "int32"
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

    def make_impl(vnni: bool):
        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((8,), "uint8", offset_factor=1),
            Q: T.Buffer((16,), "uint32", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:8], Q[0:16])
                T.writes(C[0:16])
                q = Q.vload([0], "uint32x16")
                lo = T.reinterpret(T.bitwise_and(q, T.broadcast(T.uint32(mask), 16)), dtype="int8x64")
                hi = T.reinterpret(
                    T.bitwise_and(T.shift_right(q, T.broadcast(T.uint32(4), 16)), T.broadcast(T.uint32(mask), 16)),
                    dtype="int8x64",
                )
                a_lo = T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"
                )
                a_hi = T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([4], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"
                )
                if vnni:
                    C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                        T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                            C.vload([0], dtype="int32x16"),
                            a_lo,
                            lo,
                            dtype="int32x16",
                        ),
                        a_hi,
                        hi,
                        dtype="int32x16",
                    )
                else:
                    C[T.ramp(T.int32(0), 1, 16)] = C.vload([0], dtype="int32x16") + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
                        T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"), a_lo, lo, dtype="int16x32"
                        )
                        + T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"), a_hi, hi, dtype="int16x32"
                        ),
                        T.int16x32(1),
                        dtype="int32x16",
                    )

        return impl

    for name, vnni in ((VNNI_NIBBLE_INTRIN, True), (AVX512_NIBBLE_INTRIN, False)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, desc, make_impl(vnni))


_make_nibble_intrinsics()


def _finish(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return func.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})


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


LUT_ROWS = 4  # rows sharing one in-register decode in the GEMV schedule (x 4 tiles = 16 FMA chains)
GEMV_MAX_M = 16  # with the LUT intrinsic: GEMV schedule up to this M, GEMM above (measured crossover 16..32)


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
    (``float(q·k)`` of a [B, 64] block decoded once to a local buffer, ``mi x 64`` register tile)
    above. Without AVX-512F (or ``use_lut=False``) the GEMV schedule is used for M = 1 only, as plain
    vector code.
    """
    _check_shape(N, K, B)
    if use_lut == "auto":
        use_lut = codegen.target_has_features("avx512f", target or default_target())
    if (GEMV_MAX_M if use_lut else 1) >= M:
        return _weight_only_gemv(M, N, K, B, with_bias, use_lut)
    return _weight_only_gemm(M, N, K, B, with_bias)


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
    nb = K // B
    gg = te.reduce_axis((0, B // 8), "gg")
    hh = te.reduce_axis((0, 8), "hh")
    p = te.compute(
        (M, nt, nb, LANES),
        lambda m, t, b, lane: te.sum(
            x[m, b * B + 8 * gg + hh] * _signed_nibble(qw[t, b * (B // 8) + gg, lane], hh).astype("float32"),
            axis=[gg, hh],
        ),
        name="P",
    )
    bb = te.reduce_axis((0, nb), "bb")
    acc = te.compute(
        (M, nt, LANES),
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
    p_tile, p_c = sch.split(p_lane, [None, 16])
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
    return _finish(sch.mod["main"])


def _weight_only_gemm(M, N, K, B, with_bias, codes: tuple[float, int] | None = None):
    """Per (64-channel tile, block): decode ``q·k`` [B, 64] to local, then an (mi x 64) register tile.

    ``codes = (sx, zx)`` (W4A16, no bias): ``x`` is first quantized to centred uint16 codes, and the
    products and sums run in float64, where they are exact integers (below 2^16 · 2^7 · K < 2^53), so
    the result equals int64 accumulation; then ``float32(acc) · sx · s[n]``."""
    nt, x, qw, kw, s, bias = _wo_inputs(M, N, K, B, with_bias)
    dtype = "float32" if codes is None else "float64"
    if codes is None:
        operand = x
    else:
        sx, zx = (tirx.const(float(v), "float32") for v in codes)

        def centred(m, i):  # exactly np.clip(np.rint(x / sx) + zx, 0, 65535) - zx in float32
            code = tirx.max(tirx.min(tirx.nearbyint(x[m, i] / sx) + zx, tirx.const(65535.0, "float32")), 0.0)
            return (code - zx).astype(dtype)

        operand = te.compute((M, K), centred, name="xc")

    def weight(t, i, lane):  # q · k: exact (|q·k| <= 128)
        code = _signed_nibble(qw[t, i // 8, lane], i % 8).astype(dtype)
        return code * _k_value(kw, t, i // B, dtype)(lane)

    w = te.compute((nt, K, LANES), weight, name="W")
    i = te.reduce_axis((0, K), "i")
    acc = te.compute((M, nt, LANES), lambda m, t, lane: te.sum(operand[m, i] * w[t, i, lane], axis=i), name="Acc")
    if codes is None:
        y = _wo_output(M, N, acc, s, bias)
    else:
        y = te.compute((M, N), lambda m, n: acc[m, n // LANES, n % LANES].astype("float32") * sx * s[n], name="y")
    args = [x, qw, kw, s] + ([bias] if bias is not None else []) + [y]
    sch = Schedule(te.create_prim_func(args))

    blk_w, blk_acc, blk_y = sch.get_sblock("W"), sch.get_sblock("Acc"), sch.get_sblock("y")
    m, t, lane, i = sch.get_loops(blk_acc)
    b, r = sch.split(i, [None, B])
    # float64 holds 8 lanes per register: fewer rows keep the tile within the 32 zmm registers
    mo, mi = sch.split(m, [None, _micro_rows(M) if codes is None else min(_micro_rows(M), 3)])
    sch.reorder(t, b, mo, r, mi, lane)
    sch.compute_at(blk_w, b)
    sch.set_scope(blk_w, 0, "local")
    sch.set_scope(blk_acc, 0, "local")
    sch.reverse_compute_at(blk_y, t)
    w_r, w_lane = sch.get_loops(blk_w)[-2:]
    w_g, w_h = sch.split(w_r, [None, 8])
    sch.vectorize(w_lane)
    sch.unroll(w_h)  # constant shift per nibble
    sch.unroll(mi)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(blk_y)[-1])
    sch.parallel(t)
    if codes is not None:
        xm, xi = sch.get_loops(sch.get_sblock("xc"))
        sch.parallel(xm)
        sch.vectorize(sch.split(xi, [None, 8])[1])  # K is a multiple of B, hence of 8
    sch.decompose_reduction(blk_acc, b)
    return _finish(sch.mod["main"])


def w4a16_dense(M: int, N: int, K: int, B: int, sx: float, zx: int) -> tirx.PrimFunc:
    """Scheduled W4A16 kernel ``main(x, qw, kw, s, y)`` (no bias: the caller adds it, as for W4A8).

    ``x`` float32 [M, K], quantized in-kernel to uint16 codes with ``sx``, ``zx`` (as :func:`w4a8_dense`
    does to uint8); ``qw`` / ``kw`` from :func:`repack_weight_only`; ``y`` float32 [M, N]
    ``= float32(Σ_i (xq − zx) · q · k) · sx · s[n]``, bit-exact against int64 accumulation
    (:func:`lpbq_tvm.reference.dense_int`): the sum runs in float64, exact for integers below 2^53.
    The weight-only GEMM schedule at every M (float64 lanes; no nibble LUT)."""
    _check_shape(N, K, B)
    return _weight_only_gemm(M, N, K, B, False, codes=(sx, zx))


# ----------------------------------------------------------------------------------------------
# W4A8 (uint8 activations quantized in-kernel, int32 accumulation)
# ----------------------------------------------------------------------------------------------


def _dot_intrinsic(target: tvm.target.Target | None) -> str | None:
    """``"vnni"`` / ``"avx512bw"`` from the target's features, or None (plain vector code)."""
    target = target or default_target()
    if codegen.target_has_features("avx512vnni", target):
        return "vnni"
    if codegen.target_has_features("avx512bw", target):
        return "avx512bw"
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

    ``intrinsic``: ``"auto"`` (from ``target``'s features), ``"vnni"`` (vpdpbusd), ``"avx512bw"``
    (pmaddubsw + pmaddwd) or None (no tensor intrinsic: plain vector code LLVM emits itself).

    Schemes: *nibble* (default for M < FOLD_K_MIN_M, and always without VNNI): per block b and
    64-channel tile, ``Pi = Σ xq · u`` with u = q + 8 decoded in registers by the intrinsic, then
    ``Acc += k_b · (Pi − 8 Σ_b xq)``. *fold-k* (``fold_k``; default VNNI and M >= FOLD_K_MIN_M): decode
    int8 ``q·k`` of the whole 64-channel tile once (K·64 bytes), then one VNNI accumulation over K.
    """
    _check_shape(N, K, B)
    if not 0 <= int(zx) <= 255:
        msg = f"zero point must lie in 0..255, got {zx}"
        raise ValueError(msg)
    if intrinsic == "auto":
        intrinsic = _dot_intrinsic(target)
    if intrinsic not in (None, "vnni", "avx512bw"):
        msg = f"intrinsic must be 'auto', 'vnni', 'avx512bw' or None, got {intrinsic!r}"
        raise ValueError(msg)
    if fold_k is None:
        fold_k = intrinsic == "vnni" and M >= FOLD_K_MIN_M
    if fold_k and intrinsic == "avx512bw":
        msg = "fold_k needs VNNI (or no intrinsic): pmaddubsw saturates on int8 q·k"
        raise ValueError(msg)
    nt, nb, nbh = _ceil_div(N, LANES), K // B, _ceil_div(K // B, 2)
    zx = int(zx)
    sx_c = tirx.const(float(np.float32(sx)), "float32")

    x = te.placeholder((M, K), "float32", "x")
    qw = te.placeholder((nt, K // 8, LANES), "uint32", "qw")
    kw = te.placeholder((nt, nbh, LANES), "uint8", "kw")
    wsum = te.placeholder((N,), "int32", "wsum")
    s = te.placeholder((N,), "float32", "s")
    bias = te.placeholder((N,), "float32", "bias") if with_bias else None

    def quantize(m, i):  # exactly np.clip(np.rint(x / sx) + zx, 0, 255) in float32
        code = tirx.nearbyint(x[m, i] / sx_c) + tirx.const(float(zx), "float32")
        return tirx.max(tirx.min(code, tirx.const(255.0, "float32")), tirx.const(0.0, "float32")).astype("uint8")

    xq = te.compute((M, K), quantize, name="xq")
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
            (nt, K // 8, 2, LANES),
            lambda t, g, hh, lane: tirx.Select(hh == 0, decode(t, g, 0, lane), decode(t, g, 1, lane)),
            name="Wd",
        )
        g = te.reduce_axis((0, K // 8), "g")
        h = te.reduce_axis((0, 2), "h")
        acc = te.compute(
            (M, nt, LANES),
            lambda m, t, lane: te.sum(
                xq[m, 8 * g + 4 * h + jj].astype("int32") * _byte(wd[t, g, h, lane], jj), axis=[g, h, jj]
            ),
            name="Acc",
        )
    else:
        r = te.reduce_axis((0, B), "r")
        xqs = te.compute((M, nb), lambda m, b: te.sum(xq[m, b * B + r].astype("int32"), axis=r), name="xqs")
        gg = te.reduce_axis((0, B // 8), "gg")

        def term(m, t, b, lane, hh):
            u = nibbles(qw[t, b * (B // 8) + gg, lane], hh).astype("int32")
            return xq[m, b * B + 8 * gg + 4 * hh + jj].astype("int32") * _byte(u, jj)

        pi = te.compute(
            (M, nt, nb, LANES),
            lambda m, t, b, lane: te.sum(term(m, t, b, lane, 0) + term(m, t, b, lane, 1), axis=[gg, jj]),
            name="Pi",
        )
        bb = te.reduce_axis((0, nb), "bb")
        acc = te.compute(
            (M, nt, LANES),
            lambda m, t, lane: te.sum(
                (pi[m, t, bb, lane] - xqs[m, bb] * 8) * _k_value(kw, t, bb, "int32")(lane), axis=bb
            ),
            name="Acc",
        )
    scaled = te.compute(
        (M, N),
        lambda m, n: ((acc[m, n // LANES, n % LANES] - wsum[n] * zx).astype("float32") * sx_c) * s[n],
        name="scaled",
    )
    if bias is not None:
        out = te.compute((M, N), lambda m, n: scaled[m, n] + bias[n], name="y")
        args = [x, qw, kw, wsum, s, bias, out]
    else:
        args = [x, qw, kw, wsum, s, scaled]
    sch = Schedule(te.create_prim_func(args))
    # xq stays a plain loop nest: TVM's VectorizeLoop scalarizes nearbyint; LLVM vectorizes the loop.
    if fold_k:
        _schedule_w4a8_fold(sch, M, VNNI_INTRIN if intrinsic else None)
    else:
        _schedule_w4a8_nibble(sch, M, _NIBBLE_INTRINSICS.get(intrinsic))
    if bias is not None:  # the bias add stays a separate loop nest over global `scaled`: no FMA contraction
        y_n = sch.get_loops(sch.get_sblock("y"))[-1]
        width = next(w for w in (16, 8, 4, 2, 1) if N % w == 0)
        sch.vectorize(sch.split(y_n, [None, width])[1])
    return _finish(sch.mod["main"])


def _row_tile(M: int) -> int:
    """Rows per register tile: M itself when small, else a divisor (tensorize cannot take a predicate)."""
    return M if M <= NIBBLE_ROWS else next(d for d in (NIBBLE_ROWS, 4, 6, 5, 3, 2, 1) if M % d == 0)


def _epilogue_at(sch, t):
    """``scaled = float(Acc − zx·wsum) · sx · s`` per channel tile, 64 lanes vectorized."""
    blk_sc = sch.get_sblock("scaled")
    sch.reverse_compute_at(blk_sc, t)
    sch.vectorize(sch.get_loops(blk_sc)[-1])


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


def _schedule_w4a8_nibble(sch, M, intrinsic):
    """loops (t ∥, b, (mo,) [Pi: gg, (mi,) tile4, (c16, j4) = one nibble intrinsic], Acc += k·(Pi − 8Σxq)).

    The nibble decode (and, shift, and) happens in registers, once per row group of ``mi`` rows
    (LLVM shares it across the unrolled rows).
    """
    blk_pi, blk_acc = sch.get_sblock("Pi"), sch.get_sblock("Acc")
    m, t, lane, b = sch.get_loops(blk_acc)
    mi = _row_tile(M)
    if mi < M:
        mo, m_in = sch.split(m, [None, mi])
        sch.reorder(t, b, mo, m_in, lane)
        sch.compute_at(blk_pi, mo)
        depth = 3
    else:
        sch.reorder(t, b, m, lane)
        sch.compute_at(blk_pi, b)
        depth = 2
    for blk in (blk_pi, blk_acc):
        sch.set_scope(blk, 0, "local")
    _epilogue_at(sch, t)
    inner = sch.get_loops(blk_pi)[depth:]  # (m,) lane, gg, jj — compute_at drops a unit m loop
    rows, (p_lane, p_g, p_j) = inner[:-3], inner[-3:]
    p_tile, p_c = sch.split(p_lane, [None, 16])
    sch.reorder(p_g, *rows, p_tile, p_c, p_j)
    sch.vectorize(lane)
    sch.parallel(t)
    _tensorize_or_vectorize(sch, blk_pi, p_c, p_j, p_g, intrinsic, [*rows, p_tile])
    sch.decompose_reduction(blk_acc, b)


def _schedule_w4a8_fold(sch, M, intrinsic):
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
    sch.parallel(t)
    _tensorize_or_vectorize(sch, blk_acc, c, j, g, intrinsic, [h, mi, tile])
