"""The x86 family's dense kernels and its choice among them: weight-only, W4A8, W4A16.

:func:`dense_kernel` answers the target's kernel provider (:mod:`lpbq_tvm.kernels.interface`):
for a layer of 4-bit codes, blocks of whole dwords (``B % 8 == 0``), ``K`` up to ``MAX_K`` and no
output requantization, on an x86-64 target, the scheduled kernel of the layer's mode and its
repacked weights; None otherwise (int8 per-channel layers, requantized outputs, other targets),
and the generic kernel runs.

The integer kernels choose a scheme per instruction set (:func:`w4a8_dense`): VNNI takes the
*nibble* scheme below ``Tuning.fold_k_min_rows`` rows and *fold-k* from there; pmaddubsw without
VNNI (AVX512BW, AVX2) the *block-dot* scheme; no intrinsic, plain vector code of the nibble scheme
(fold-k for B = 8). W4A16 runs as byte planes of those, or, where the CPU's tuning says so, the
*madd* scheme (:func:`w4a16_scheme`).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from lpbq_tvm.kernels.generic import row_encodings
from lpbq_tvm.kernels.interface import DenseLayer, KernelChoice, built
from lpbq_tvm.kernels.tiled import nibble
from lpbq_tvm.kernels.tiled.integer import MAX_K, DotInstructions, build_byte_planes, encoding_inputs
from lpbq_tvm.kernels.tiled.repack import LANES, check_shape, repack_w4a8, repack_weight_only
from lpbq_tvm.kernels.x86 import block_dot, fold_k
from lpbq_tvm.kernels.x86.intrinsics import NIBBLE_LANES, vnni_nibble_intrinsic
from lpbq_tvm.kernels.x86.isa import BLOCK_DOT_INSTRUCTIONS, dot_instructions, is_x86
from lpbq_tvm.kernels.x86.madd import w4a16_madd_dense
from lpbq_tvm.kernels.x86.tuning import tuning
from lpbq_tvm.kernels.x86.weight_only import weight_only_dense
from lpbq_tvm.packing import pack

__all__ = ["dense_kernel", "w4a8_dense", "w4a16_dense", "w4a16_scheme"]

KERNEL_NAME = "lpbq_dense_x86"
_SCHEMES = {"fold-k": fold_k, "block-dot": block_dot, "nibble": nibble}  # of the uint8 kernel


def dense_kernel(layer: DenseLayer, target: tvm.target.Target) -> KernelChoice | None:
    """The scheduled kernel for ``layer`` on ``target`` and its weights (``lpbq_qw``, ``lpbq_kw``,
    [``lpbq_wsum``], ``lpbq_s``), or None where this family does not serve it (module docstring)."""
    integer, encoding = layer.integer, layer.encoding
    if not is_x86(target) or (integer is not None and integer.output_encoding is not None):
        return None
    if encoding.bitwidth > 4 or encoding.block_size % 8 or layer.depth > MAX_K:
        return None
    rows, channels, depth, block = layer.rows, layer.channels, layer.depth, encoding.block_size
    packed = pack(encoding)
    if integer is None:
        qw, kw = repack_weight_only(packed.q, packed.k, channels, depth, block)
        weights = {"lpbq_qw": qw, "lpbq_kw": kw, "lpbq_s": packed.scale}
        func = built(weight_only_dense, rows, channels, depth, block, layer.has_bias, target=target)
    else:
        qw, kw, wsum = repack_w4a8(packed.q, packed.k, channels, depth, block)
        x = integer.input_encoding
        weights = {"lpbq_qw": qw, "lpbq_kw": kw, "lpbq_wsum": wsum, "lpbq_s": packed.scale} | encoding_inputs(x)
        shape = (rows, channels, depth, block, layer.has_bias)
        if x.bitwidth > 8:
            func = built(w4a16_dense, *shape, target=target)
        else:
            func = built(w4a8_dense, *shape, target=target, rowwise=integer.rowwise)
        return KernelChoice(func, weights, KERNEL_NAME, row_encodings if integer.rowwise else None)
    return KernelChoice(func, weights, KERNEL_NAME)


def w4a8_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    with_bias: bool = False,
    *,
    target: tvm.target.Target,
    intrinsic: str | None = "auto",
    fold_k: bool | None = None,
    rowwise: bool = False,
) -> tirx.PrimFunc:
    """Scheduled W4A8 kernel ``main(x, qw, kw, wsum, s, sx, zx, [bias], y)`` (:mod:`~lpbq_tvm.kernels.tiled.integer`;
    the input's scale and zero point are run-time values); ``rowwise``: ``main(x, sx, zx, qw, kw, wsum, s, [bias], y)``,
    an encoding per row (mode ``w4a8-dynamic``).

    ``intrinsic``: ``"auto"`` (from ``target``'s features), ``"vnni"`` (vpdpbusd), ``"avx512bw"``
    (pmaddubsw + pmaddwd on zmm), ``"avx2"`` (the same on ymm) or None (no tensor intrinsic: plain
    vector code LLVM emits itself). ``fold_k``: force or forbid the fold-k scheme (default: the
    module docstring's choice).
    """
    return _byte_planes(M, N, K, B, 8, with_bias, target, intrinsic, fold_k, rowwise)


def w4a16_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    with_bias: bool = False,
    *,
    target: tvm.target.Target,
    intrinsic: str | None = "auto",
    fold_k: bool | None = None,
    scheme: str = "auto",
) -> tirx.PrimFunc:
    """Scheduled W4A16 kernel: :func:`w4a8_dense`'s arguments, with ``x`` quantized to uint16 codes
    (``zx`` in 0..65535). Bit-exact against int64 accumulation in every scheme: ``"planes"``
    (``intrinsic`` and ``fold_k`` choose among :func:`w4a8_dense`'s variants), ``"madd"``
    (:mod:`~lpbq_tvm.kernels.x86.madd`) or ``"auto"`` (:func:`w4a16_scheme`)."""
    if scheme == "auto":
        scheme = w4a16_scheme(M, target)
    if scheme == "planes":
        return _byte_planes(M, N, K, B, 16, with_bias, target, intrinsic, fold_k)
    if scheme != "madd":
        msg = f"scheme must be 'auto', 'planes' or 'madd', got {scheme!r}"
        raise ValueError(msg)
    check_shape(N, K, B)
    return w4a16_madd_dense(M, N, K, B, with_bias, target)


def w4a16_scheme(M: int, target: tvm.target.Target) -> str:
    """``"madd"`` from ``Tuning.madd_min_rows`` rows where the target's CPU has that tuning, else ``"planes"``."""
    threshold = tuning(target).madd_min_rows
    return "madd" if threshold is not None and threshold <= M else "planes"


def _byte_planes(M, N, K, B, bits, with_bias, target, intrinsic, fold, rowwise=False) -> tirx.PrimFunc:
    """:func:`w4a8_dense` (``bits = 8``) and :func:`w4a16_dense`'s planes (16: two byte-plane rows per row)."""
    check_shape(N, K, B)
    if K > MAX_K:
        msg = f"the uint8 · int8 sums fit int32 up to K = {MAX_K} (255 · 128 · K), got K={K}"
        raise ValueError(msg)
    if intrinsic == "auto":
        intrinsic = dot_instructions(target)
    if intrinsic not in (None, "vnni", *BLOCK_DOT_INSTRUCTIONS):
        msg = f"intrinsic must be 'auto', 'vnni', 'avx512bw', 'avx2' or None, got {intrinsic!r}"
        raise ValueError(msg)
    rows = bits // 8 * M  # rows of the uint8 kernel
    tune = tuning(target)
    if fold is None:  # the nibble scheme's loop over a block's dwords needs two of them (B >= 16)
        fold = intrinsic == "vnni" and rows >= tune.fold_k_min_rows or intrinsic in ("vnni", None) and B == 8
    block = intrinsic in BLOCK_DOT_INSTRUCTIONS
    if fold and block:
        msg = "fold_k needs VNNI (or no intrinsic): pmaddubsw saturates on int8 q·k"
        raise ValueError(msg)
    if not (fold or block) and B == 8:
        msg = "the nibble scheme needs blocks of two dwords or more (B >= 16), got B=8: use fold_k"
        raise ValueError(msg)
    scheme = _SCHEMES["fold-k" if fold else "block-dot" if block else "nibble"]
    streamed = tune.nibble_rows >= rows  # one row group reads each nibble once, in order: prefetch them
    prefetch = tune.prefetch_rows * LANES * streamed
    nibble_intrinsic = vnni_nibble_intrinsic(prefetch) if intrinsic == "vnni" and scheme is nibble else None
    dot = DotInstructions(intrinsic, NIBBLE_LANES, nibble_intrinsic)
    return build_byte_planes(M, N, K, B, bits, with_bias, target, tune, dot, scheme, rowwise)
