"""The x86 tensor intrinsics of the LPBQ kernels: one vector instruction sequence per call, registered by name.

* :func:`vnni_intrinsic` — ``C[16] (int32) += A[4] (uint8, broadcast) · B[16]`` (4 int8 per dword):
  one ``vpdpbusd`` on local buffers (the fold-k scheme);
* :func:`vnni_nibble_intrinsic` — the same over the nibble dwords of the W4A8 layout, decoded in
  registers (and, shift, and): two ``vpdpbusd`` per load of 16 dwords (the nibble scheme);
* :func:`lut_intrinsic` — ``C[16] (f32) += Σ_h X[h] · float(signed nibble h of Q[i])``: ``vpermps``
  with the 16 nibble values as its table decodes a nibble to float in one shuffle (weight-only GEMV);
* :func:`block_dot_intrinsic` — pmaddubsw sums of up to 32 k-positions of one block in int16,
  scaled by the block's ``k`` in the pmaddwd that widens them (the block-dot scheme);
* :func:`madd_intrinsic` — one pmaddwd of int16 codes and int16 ``q·k`` pairs (W4A16 madd scheme).

LLVM 17 and later declare ``vpdpbusd.512`` with byte vectors, ``(<16 x i32>, <64 x i8>, <64 x i8>)``:
TVM's own ``dot_16x4_vnni`` tensorizes but fails in codegen, hence these. Tensor intrinsics are
registered globally by name: a variant that differs in its code must differ in its name. Each is
registered on first use (the function that names it), not on import: parsing their TVMScript takes
most of a second per family, which every ``lpbq-tvm`` command would pay.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from lpbq_tvm.kernels.tiled.decode import byte
from lpbq_tvm.kernels.tiled.descriptions import broadcast_codes, nibble_dot
from lpbq_tvm.kernels.x86.isa import BLOCK_DOT_INSTRUCTIONS

__all__ = [
    "BLOCK_DOT_GROUPS",
    "NIBBLE_LANES",
    "block_dot_groups",
    "block_dot_intrinsic",
    "lut_intrinsic",
    "madd_intrinsic",
    "vnni_intrinsic",
    "vnni_nibble_intrinsic",
]

_VNNI = "lpbq_dot_16x4_vnni_local"


def prefetch(address):
    """``llvm.prefetch`` (read, keep in all cache levels, data) of the line at ``address``: a streaming
    intrinsic's call asks for the weights it will read a few calls later. Its implementation must then
    be written as one expression per statement: a TVMScript binding (``q = ...``) after the prefetch
    statement is stored to memory and read back, once per call."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 3, 1)


def vnni_intrinsic() -> str:
    """``C[16] (int32) += A[4] (uint8, broadcast) · B[16]`` as one ``vpdpbusd``; registered on first use."""
    if TensorIntrin.get(_VNNI, allow_missing=True) is not None:
        return _VNNI

    # B is 16 int32 dwords, each packing the 4 int8 operands of one output lane (byte j = k-position j):
    # exactly the second source of vpdpbusd. The description extracts byte j by shift + truncation.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16,), "int32", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
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
        B: T.Buffer((16,), "int32", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        # LLVM >= 17 declares vpdpbusd.512 as (<16 x i32>, <64 x i8>, <64 x i8>): pass bytes.
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                broadcast_codes(A, 0, 16),
                T.reinterpret(B.vload([0], "int32x16"), dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(_VNNI, desc, vnni)
    return _VNNI


_VNNI_NIBBLE = "lpbq_dot_16x8_nibbles_vnni"
NIBBLE_LANES = 16  # output channels per VNNI instruction (zmm)


def vnni_nibble_intrinsic(ahead: int = 0) -> str:
    """The nibble scheme's dot product (``tiled.descriptions.nibble_dot``): the decode (and, shift, and)
    in registers, two ``vpdpbusd`` per load of 16 dwords; registered on first use. With ``ahead`` (the
    nibbles streamed once, by a single row group), a call also prefetches the line that many dwords
    past its own."""
    name = _VNNI_NIBBLE + (f"_prefetch{ahead}" if ahead else "")
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    n = NIBBLE_LANES

    def nibbles(Q, high: bool):  # the offset-binary bytes of the low (or high) nibbles, int8 x 4n
        word = Q.vload([0], f"uint32x{n}")
        word = T.shift_right(word, T.broadcast(T.uint32(4), n)) if high else word
        return T.reinterpret(T.bitwise_and(word, T.broadcast(T.uint32(_MASK), n)), dtype=f"int8x{4 * n}")

    def vpdpbusd(acc, a, b):
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc, a, b, dtype=f"int32x{n}"
        )

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], Q[0:n])
            T.writes(C[0:n])
            if ahead > 0:
                T.evaluate(prefetch(Q.access_ptr("r", offset=ahead)))
            C[T.ramp(T.int32(0), 1, n)] = vpdpbusd(
                vpdpbusd(C.vload([0], dtype=f"int32x{n}"), broadcast_codes(A, 0, n), nibbles(Q, False)),
                broadcast_codes(A, 4, n),
                nibbles(Q, True),
            )

    TensorIntrin.register(name, nibble_dot(n), impl)
    return name


_LUT = "lpbq_fma_16x8_nibble_lut"


def lut_intrinsic(ahead: int = 0) -> str:
    """``C[16] (f32) += Σ_h X[h] · float(signed nibble h of Q[i])``: ``vpermps`` with the 16 nibble values
    as the table decodes a nibble to float in one shuffle (it reads only the low 4 index bits, so no
    mask is needed), then one FMA per 16 weights. Registered on first use. With ``ahead`` (the nibbles
    streamed once, by a single row group), a call also prefetches the line that many dwords past its own."""
    name = _LUT + (f"_prefetch{ahead}" if ahead else "")
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(
        X: T.Buffer((8,), "float32", offset_factor=1),
        Q: T.Buffer((16,), "uint32", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1),
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

    def table():  # table[u] = float(signed 4-bit u) = 0..7, -8..-1 (constant-folded by LLVM)
        return T.Cast(
            "float32x16", T.shift_right(T.shift_left(T.ramp(0, 1, 16), T.broadcast(28, 16)), T.broadcast(28, 16))
        )

    def nibble(Q, h):  # each dword shifted so that nibble h is in its low 4 bits, the only ones vpermps reads
        return T.shift_right(T.reinterpret(Q.vload([0], "uint32x16"), dtype="int32x16"), T.broadcast(h * 4, 16))

    @T.prim_func(s_tir=True)
    def impl(
        X: T.Buffer((8,), "float32", offset_factor=1),
        Q: T.Buffer((16,), "uint32", offset_factor=1),
        C: T.Buffer((16,), "float32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], X[0:8], Q[0:16])
            T.writes(C[0:16])
            if ahead > 0:
                T.evaluate(prefetch(Q.access_ptr("r", offset=ahead)))
            for h in T.unroll(8):
                C[T.ramp(0, 1, 16)] = C.vload([0], "float32x16") + T.broadcast(X[h], 16) * T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.sf.512"),
                    table(),
                    nibble(Q, h),
                    dtype="float32x16",
                )

    TensorIntrin.register(name, desc, impl)
    return name


BLOCK_DOT_GROUPS = 4  # dwords of 8 k-positions per int16 sum: 2 · 4 pmaddubsw · (2 · 255 · 8) = 32640 < 2^15
_MASK = 0x0F0F0F0F


def block_dot_groups(B: int) -> int:
    """Dwords per int16 sum: up to BLOCK_DOT_GROUPS, dividing the block's B / 8."""
    return next(d for d in (BLOCK_DOT_GROUPS, 2, 1) if (B // 8) % d == 0)


def block_dot_intrinsic(instructions: str, groups: int, decoded: bool = False, prefetch_rows: int = 0) -> str:
    """The tensor intrinsic ``C[n] += k[n] · Σ_{g, j} A[8g + j] · q[g, n, j]`` over ``8 · groups``
    k-positions of one block (q signed, −8..7), registered on first use. ``q`` is decoded in registers
    from the weights' nibble dwords ``Q[g, n]`` (and, shift, subtract), or with ``decoded`` read from
    a local buffer ``Q[g, hh, n]`` of the signed bytes of k-positions ``8g + 4hh + j``.

    pmaddubsw sums u8 · s8 pairs into int16 (|pair| <= 2 · 255 · 8 = 4080), ``2 · groups`` of them add
    in int16 without overflow, and one pmaddwd with (k, k) int16 pairs scales by the block's k while
    widening to int32: per 64 MACs two multiplies plus 1/groups, against three in the nibble scheme,
    and no per-block epilogue.

    With ``prefetch_rows`` (the nibbles streamed once, by a single row group), a call also prefetches
    its lanes that many dword rows ahead.
    """
    n = BLOCK_DOT_INSTRUCTIONS[instructions][2]
    variant = ("_decoded" if decoded else "") + (f"_prefetch{prefetch_rows}" if prefetch_rows else "")
    name = f"lpbq_block_dot_{n}x{8 * groups}_{instructions}{variant}"
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(
            name,
            _block_dot_description(n, groups, decoded),
            _block_dot_implementation(instructions, groups, decoded, prefetch_rows),
        )
    return name


def _block_dot_q(n: int, groups: int, decoded: bool):
    """The shape and dtype of the block-dot intrinsic's q operand, and its read region."""
    if decoded:
        return (groups, 2, n), "int32", lambda Q: Q[0:groups, 0:2, 0:n]
    return (groups, n), "uint32", lambda Q: Q[0:groups, 0:n]


def _block_dot_description(n: int, groups: int, decoded: bool):
    q_shape, q_dtype, q_region = _block_dot_q(n, groups, decoded)

    def code(Q, i, g, hh, j):  # signed q at k-position 8g + 4hh + j of channel i
        if decoded:
            return byte(Q[g, hh, i], j)
        offset = T.bitwise_and(T.shift_right(Q[g, i], T.uint32(4)) if hh else Q[g, i], T.uint32(_MASK))
        return byte(T.cast(offset, "int32"), j) - 8

    def update(A, Q, Kb, i, g, j):  # (the product at k-positions 8g + j and 8g + 4 + j) · k
        products = T.cast(A[g * 8 + j], "int32") * code(Q, i, g, 0, j)
        return (products + T.cast(A[g * 8 + 4 + j], "int32") * code(Q, i, g, 1, j)) * T.cast(Kb[i], "int32")

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, q: T.handle, kb: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8 * groups,), "uint8", offset_factor=1)
        Q = T.match_buffer(q, q_shape, q_dtype, offset_factor=1)
        Kb = T.match_buffer(kb, (n,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (n,), "int32", offset_factor=1)
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

    return desc


def _block_dot_implementation(instructions: str, groups: int, decoded: bool, prefetch_rows: int):
    maddubs, maddwd, n = BLOCK_DOT_INSTRUCTIONS[instructions]
    q_shape, q_dtype, q_region = _block_dot_q(n, groups, decoded)
    q_strides = [T.int32(), T.int32(), 1] if decoded else [T.int32(), 1]

    def signed(Q, g, hh):  # the signed bytes of one load, int8 x 4n
        if decoded:
            return T.reinterpret(Q.vload([g, hh, 0], f"int32x{n}"), dtype=f"int8x{4 * n}")
        word = Q.vload([g, 0], f"uint32x{n}")
        offset = T.bitwise_and(
            T.shift_right(word, T.broadcast(T.uint32(4), n)) if hh else word, T.broadcast(T.uint32(_MASK), n)
        )
        return T.reinterpret(offset, dtype=f"int8x{4 * n}") - T.broadcast(T.int8(8), 4 * n)

    def products(A, Q):  # Σ of 2 · groups pmaddubsw results, int16 x 2n
        total = None
        for g in range(groups):
            for hh in range(2):
                term = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddubs),
                    broadcast_codes(A, 8 * g + 4 * hh, n),
                    signed(Q, g, hh),
                    dtype=f"int16x{2 * n}",
                )
                total = term if total is None else total + term
        return total

    def k_pairs(Kb):  # (k, k) int16 pairs, one dword per channel
        k = T.cast(Kb.vload([0], f"uint8x{n}"), f"int32x{n}")
        return T.reinterpret(T.bitwise_or(k, T.shift_left(k, T.broadcast(16, n))), dtype=f"int16x{2 * n}")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, q: T.handle, kb: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8 * groups,), "uint8", offset_factor=1)
        Q = T.match_buffer(q, q_shape, q_dtype, offset_factor=1, strides=q_strides)
        Kb = T.match_buffer(kb, (n,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (n,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:n], A[0 : 8 * groups], q_region(Q), Kb[0:n])
            T.writes(C[0:n])
            if prefetch_rows > 0:
                for g in T.unroll(groups):
                    T.evaluate(prefetch(T.address_of(Q[prefetch_rows + g, 0])))
            C[T.ramp(T.int32(0), 1, n)] = C.vload([0], dtype=f"int32x{n}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd), products(A, Q), k_pairs(Kb), dtype=f"int32x{n}"
            )

    return impl


def madd_intrinsic(instructions: str) -> str:
    """The tensor intrinsic ``C[n] += Σ_j A[j] · int16 j of W[n]`` over one pair of k-positions, for
    the madd scheme: ``A`` two int16 codes (broadcast as a dword), ``W`` n dwords each holding a
    channel's two int16 weights; one pmaddwd (``instructions``: ``"avx512bw"`` zmm, ``"avx2"`` ymm)
    and one add. Registered on first use."""
    maddwd, n = BLOCK_DOT_INSTRUCTIONS[instructions][1:]
    name = f"lpbq_madd_{n}x2_{instructions}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, w: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        W = T.match_buffer(w, (n,), "int32", offset_factor=1)
        C = T.match_buffer(c, (n,), "int32", offset_factor=1)
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
        W = T.match_buffer(w, (n,), "int32", offset_factor=1)
        C = T.match_buffer(c, (n,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:n], A[0:2], W[0:n])
            T.writes(C[0:n])
            C[T.ramp(T.int32(0), 1, n)] = C.vload([0], dtype=f"int32x{n}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddwd),
                T.reinterpret(  # the two codes in every dword
                    T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), n), dtype=f"int16x{2 * n}"
                ),
                T.reinterpret(W.vload([0], f"int32x{n}"), dtype=f"int16x{2 * n}"),
                dtype=f"int32x{n}",
            )

    TensorIntrin.register(name, desc, impl)
    return name
