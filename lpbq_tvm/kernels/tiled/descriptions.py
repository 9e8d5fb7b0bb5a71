"""What the shared schemes' tensor intrinsics compute, as TIR descriptions free of any instruction set.

A family registers each description with its own implementation (``TensorIntrin.register(name, desc,
impl)``): :func:`nibble_dot` is the nibble scheme's (:mod:`.nibble`) — x86 implements it with two
``vpdpbusd``, aarch64 with two ``udot``. The descriptions use the expressions of :mod:`.decode`, as the
schemes' computes do, so that tensorize matches them. :func:`broadcast_codes` is an operand both
families' implementations build.
"""

from __future__ import annotations

from tvm.script import tirx as T

from lpbq_tvm.kernels.tiled.decode import byte, lane_pair_bytes, nibbles, unsigned_byte

__all__ = ["broadcast_codes", "lane_pair_dot", "nibble_dot"]


def broadcast_codes(A, first: int, lanes: int):
    """The four codes ``A[first : first + 4]`` in each of ``lanes`` dwords, as ``4 lanes`` unsigned bytes:
    the operand a dot-product instruction multiplies every lane's four weight bytes by."""
    dword = T.reinterpret(A.vload([first], "uint8x4"), dtype="int32")
    return T.reinterpret(T.broadcast(dword, lanes), dtype=f"uint8x{4 * lanes}")


def nibble_dot(lanes: int):
    """``C[i] += Σ_j A[j] · u_lo[i, j] + A[4 + j] · u_hi[i, j]`` for ``lanes`` channels, where dword ``Q[i]``
    of the integer layout holds ``u = q + 8`` of k-positions j (low nibble) and 4 + j (high) in byte j."""
    n = lanes

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((8,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((n,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:8], Q[0:n])
            T.writes(C[0:n])
            for i in T.serial(0, n):
                for kk in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + (
                            T.cast(A[vk], "int32") * byte(T.cast(nibbles(Q[vi], 0), "int32"), vk)
                            + T.cast(A[vk + 4], "int32") * byte(T.cast(nibbles(Q[vi], 1), "int32"), vk)
                        )

    return desc


def lane_pair_dot(lanes: int):
    """``C[s, i] += Σ_j A[j] · byte j of lane_pair_bytes(Q[i], s)`` for ``lanes`` dwords of the lane-pair
    layout: ``s = 0`` sums the raw bytes, ``s = 1`` the high nibbles (times 16); ``C``'s two rows may lie
    apart (a stride)."""
    n = lanes
    stride = T.int32()

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        Q: T.Buffer((n,), "uint32", offset_factor=1),
        C: T.Buffer((2, n), "int32", strides=(stride, 1), offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:n], A[0:4], Q[0:n])
            T.writes(C[0:2, 0:n])
            for s, i, kk in T.grid(2, n, 4):
                with T.sblock("update"):
                    vs, vi, vk = T.axis.remap("SSR", [s, i, kk])
                    C[vs, vi] = C[vs, vi] + T.cast(A[vk], "int32") * unsigned_byte(lane_pair_bytes(Q[vi], vs), vk)

    return desc
