"""The x86 weight-only kernel: odd shapes, row tails, panel decodes, instruction sets, within the float bound."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from kernel_cases import SHAPES, reference_weight_only, weight_only_tolerance, weights
from tvm.s_tir import Schedule
from x86_cases import TARGET, compiled, host_runs, run

from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.kernels.x86.isa import register_dwords
from lpbq_tvm.kernels.x86.tuning import tuning
from lpbq_tvm.packing import pack_nibbles

TUNING = tuning(TARGET)


@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_weight_only(M, N, K, B):
    with_bias = (M + N + K // B) % 2 == 0
    rng = np.random.default_rng(M * 1000 + N + K + B)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32) * 4
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = compiled(("wo", M, N, K, B, with_bias), lambda: fk.weight_only_dense(M, N, K, B, with_bias, target=TARGET))
    got = run(lib, [x, qw, kw, s] + ([bias] if with_bias else []), M, N)
    ref = reference_weight_only(x, q, k, s, B, bias)
    assert got.shape == (M, N)
    assert np.all(np.abs(got - ref) <= weight_only_tolerance(x, q, k, s, B, bias))


@pytest.mark.parametrize("M", [7, 37])
def test_weight_only_row_tails(M):
    """Row counts without a handy divisor: GEMV row groups of 1 (M = 7), GEMM with a predicated tail (M = 37)."""
    N, K, B = 100, 192, 64
    rng = np.random.default_rng(M)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = run(tvm.compile(fk.weight_only_dense(M, N, K, B, target=TARGET), TARGET), [x, qw, kw, s], M, N)
    assert np.all(np.abs(got - reference_weight_only(x, q, k, s, B)) <= weight_only_tolerance(x, q, k, s, B, None))


@pytest.mark.parametrize(
    ("K", "B", "dword_loops"),
    [
        (512, 64, [512 // 8]),  # a 128 KiB tile: decoded whole, its loop runs over all of K
        (768, 64, [3, 256 // 8]),  # 12 blocks: 3 panels of 4 blocks (256 k positions)
        (640, 64, [5, 128 // 8]),  # 10 blocks: 4 does not divide them, 2 does
        (640, 16, [4, 160 // 8]),  # 40 blocks of 16: panels of 10
        (1024, 512, [2, 512 // 8]),  # a block longer than a panel: one block per panel
    ],
)
def test_weight_only_gemm_decodes_a_large_tile_panel_by_panel(K, B, dword_loops):
    """Above 128 KiB of decoded floats per 64-channel tile, the tile is decoded in panels of whole
    blocks (a loop over the panels outside), as many blocks as divide K within 256 k positions; each
    panel dword by dword, a vector register of channels at a time, its 8 nibbles unrolled. All
    compute the same products."""
    M, N = 32, 100
    func = fk.weight_only_dense(M, N, K, B, use_lut=False, target=TARGET)
    sch = Schedule(func)
    v = register_dwords(TARGET)
    decode_loops = [*dword_loops, 64 // v, 8, v]
    assert [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("W"))][1:] == decode_loops
    rng = np.random.default_rng(M)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = run(tvm.compile(func, TARGET), [x, qw, kw, s], M, N)
    assert np.all(np.abs(got - reference_weight_only(x, q, k, s, B)) <= weight_only_tolerance(x, q, k, s, B, None))


@pytest.mark.parametrize("K", [256, 768])  # decoded whole; in 3 panels
def test_weight_only_gemm_decodes_every_code_exactly(K):
    """The GEMM's decoded weights are exactly q·k: identity rows of x read them out one by one, so
    y = float32(q·k · s) bit for bit, for every nibble position of a dword and every code -8..7."""
    N, B = 100, 64
    rng = np.random.default_rng(K)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = np.eye(K, dtype=np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = run(tvm.compile(fk.weight_only_dense(K, N, K, B, use_lut=False, target=TARGET), TARGET), [x, qw, kw, s], K, N)
    assert np.array_equal(got, (q * np.repeat(k, B, axis=1)).T.astype(np.float32) * s)


def test_weight_only_zero_codes_exact():
    """All-zero codes give exactly 0 (signed decode, no offset cancellation)."""
    M, N, K, B = 1, 100, 128, 64
    q, k = np.zeros((N, K), int), np.full((N, K // B), 16)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32) * 1e3
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = compiled(("wo", M, N, K, B, False), lambda: fk.weight_only_dense(M, N, K, B, target=TARGET))
    assert not run(lib, [x, qw, kw, np.ones(N, np.float32)], M, N).any()


def test_weight_only_gemv_prefetches_the_streamed_nibbles():
    """The LUT GEMV of one row group (up to ``lut_rows`` rows: each nibble read once) prefetches its
    nibbles ``prefetch_rows`` dword rows (of 64 lanes) ahead; with several row groups it does not.
    Values are checked by the tests above at these M."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    tune = tuning(target)
    for M, prefetched in ((1, True), (tune.lut_rows, True), (tune.lut_rows + 1, False)):
        script = fk.weight_only_dense(M, 64, 256, 64, target=target).script()
        assert ("llvm.prefetch" in script) == prefetched, M
        assert not prefetched or f"{tune.prefetch_rows * 64}" in script


@pytest.mark.parametrize("cpu", ["skylake-avx512", "haswell"])
@pytest.mark.parametrize("M", [1, 3, 32])
@pytest.mark.parametrize("B", [8, 64])
def test_weight_only_instruction_sets(cpu, M, B):
    """AVX-512 decodes nibbles with the vpermps LUT (zmm) up to GEMV_MAX_M rows; AVX2 runs ymm code
    (GEMV at M = 1, 16-lane GEMM tiles above); blocks of one dword (B = 8) take the GEMM schedule at
    every M; within tolerance where the host can run it."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2})
    N, K = 100, 2 * B
    rng = np.random.default_rng(5)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    lib = tvm.compile(fk.weight_only_dense(M, N, K, B, target=target), target)
    asm = lib.mod.inspect_source("asm")
    assert ("%zmm" in asm) == (cpu == "skylake-avx512") and "%ymm" in asm
    lut = re.search(r"vperm(ps|d)\s+%zmm", asm) is not None  # LLVM picks either form of the float table lookup
    assert lut == (cpu == "skylake-avx512" and TUNING.gemv_max_m >= M and B > 8)
    if host_runs(target):
        got = run(lib, [x, *fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B), s], M, N)
        ref = reference_weight_only(x, q, k, s, B)
        assert np.all(np.abs(got - ref) <= weight_only_tolerance(x, q, k, s, B, None))
