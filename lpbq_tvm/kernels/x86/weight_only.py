"""The x86 weight-only kernel: the shared kernel of :mod:`lpbq_tvm.kernels.tiled.weight_only`, chosen by M.

GEMV up to ``Tuning.gemv_max_m`` rows with AVX-512 (nibbles decoded by the vpermps LUT intrinsic),
else for M = 1 only (plain vector code); GEMM above, with register tiles of 64 lanes (AVX-512) or 16.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.target import codegen

from lpbq_tvm.kernels.tiled.repack import LANES, check_shape
from lpbq_tvm.kernels.tiled.weight_only import weight_only_gemm, weight_only_gemv
from lpbq_tvm.kernels.x86.intrinsics import lut_intrinsic
from lpbq_tvm.kernels.x86.isa import register_dwords
from lpbq_tvm.kernels.x86.tuning import tuning

__all__ = ["weight_only_dense"]

GEMV_LANES = 16  # channels per LUT intrinsic call (a zmm of floats), the GEMV's channel chunk


def weight_only_dense(
    M: int,
    N: int,
    K: int,
    B: int,
    with_bias: bool = False,
    *,
    target: tvm.target.Target,
    use_lut: bool | str = "auto",
) -> tirx.PrimFunc:
    """Scheduled weight-only kernel ``main(x, qw, kw, s, [bias], y)``.

    ``x`` float32 [M, K], ``qw`` / ``kw`` from :func:`~lpbq_tvm.kernels.tiled.repack.repack_weight_only`,
    ``s`` / ``bias`` float32 [N], ``y`` float32 [M, N]. Without AVX-512F (or with ``use_lut=False``)
    the GEMV schedule is used for M = 1 only, as plain vector code.
    """
    check_shape(N, K, B)
    avx512 = codegen.target_has_features("avx512f", target)
    if use_lut == "auto":
        use_lut = avx512
    tune = tuning(target)
    if (tune.gemv_max_m if use_lut else 1) >= M and B > 8:  # the GEMV's loop over a block's dwords needs two
        streamed = tune.lut_rows >= M  # one row group reads each nibble once, in order: prefetch them
        lut = lut_intrinsic(tune.prefetch_rows * LANES * streamed) if use_lut else None
        return weight_only_gemv(M, N, K, B, with_bias, chunk=GEMV_LANES, lut_intrinsic=lut, lut_rows=tune.lut_rows)
    return weight_only_gemm(
        M, N, K, B, with_bias, width=LANES if avx512 else 16, register_lanes=register_dwords(target),
        whole_tile_bytes=tune.whole_tile_bytes, panel_k=tune.panel_k, target=target,
    )  # fmt: skip
