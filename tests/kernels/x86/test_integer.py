"""The x86 W4A8 / W4A16 kernels: bit-exact over odd shapes, saturating inputs and extreme accumulators,
in every scheme and instruction set, and the choice among them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from kernel_cases import SHAPES, activations, reference_rowwise, reference_w4a8, rowwise_activations, weights
from tvm import tirx
from tvm.s_tir import Schedule
from x86_cases import HASWELL, TARGET, ZEN1, check_integer_kernel, compiled, encoding, run

from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding
from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.kernels.tiled.integer import W4A16_INT32_MAX_K, encoding_inputs
from lpbq_tvm.kernels.x86.tuning import tuning
from lpbq_tvm.packing import pack_nibbles

TUNING = tuning(TARGET)


@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_w4a8_bit_exact(M, N, K, B):
    with_bias = (M + N + K // B) % 2 == 1
    rng = np.random.default_rng(M * 7 + N + K * 3 + B)
    sx, zx = (0.25, 128) if (M + B) % 2 else (0.0371, (0, 17, 255)[(N + K) % 3])
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = activations(M, K, sx, zx, rng)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = compiled(("w4a8", M, N, K, B, with_bias), lambda: fk.w4a8_dense(M, N, K, B, with_bias, target=TARGET))
    got = run(lib, [x, qw, kw, wsum, s, *encoding(sx, zx)] + ([bias] if with_bias else []), M, N)
    ref = reference_w4a8(x, q, k, s, B, sx, zx, bias)
    assert got.shape == (M, N) and got.dtype == np.float32
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("zx", [0, 255])
@pytest.mark.parametrize("M", [3, TUNING.decoded_min_rows])  # weights decoded in registers / once per tile
def test_w4a8_extreme_accumulator(zx, M):
    """q = −8, k = 16 everywhere and fully saturated x: the largest |acc| the format allows."""
    N, K, B = 100, 512, 128
    q, k = np.full((N, K), -8), np.full((N, K // B), 16)
    x = np.where(np.arange(K) % 2, 1e9, -1e9).astype(np.float32)[None].repeat(M, 0)
    s = np.full(N, 0.5, np.float32)
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = compiled(("w4a8", M, N, K, B, False), lambda: fk.w4a8_dense(M, N, K, B, target=TARGET))
    got = run(lib, [x, qw, kw, wsum, s, *encoding(0.5, zx)], M, N)
    ref = reference_w4a8(x, q, k, s, B, 0.5, zx)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("scheme", ["planes", "madd"])
@pytest.mark.parametrize("M", [1, 3, 8, 32])
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_w4a16_bit_exact(M, N, K, B, scheme):
    with_bias = (M + N + K // B) % 2 == 1
    rng = np.random.default_rng(M * 5 + N + K * 3 + B)
    sx, zx = (2.0**-10, 32768) if (M + B) % 2 else (3.7e-4, (0, 1717, 65535)[(N + K) % 3])
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = activations(M, K, sx, zx, rng, qmax=65535)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    qw, kw, wsum = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    lib = compiled(
        ("w4a16", M, N, K, B, with_bias, scheme),
        lambda: fk.w4a16_dense(M, N, K, B, with_bias, scheme=scheme, target=TARGET),
    )
    got = run(lib, [x, qw, kw, wsum, s, *encoding(sx, zx, 16)] + ([bias] if with_bias else []), M, N)
    ref = reference_w4a8(x, q, k, s, B, sx, zx, bias, bitwidth=16)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize(
    ("M", "scheme", "B"),
    [(2, "planes", 64), (16, "planes", 64), (2, "madd", 64), (49, "madd", 64), (49, "madd", 16)],
)
@pytest.mark.parametrize("zx", [0, 65535])
@pytest.mark.parametrize("K", [W4A16_INT32_MAX_K, 2048])
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
    lib = compiled(
        ("w4a16", M, N, K, B, False, scheme), lambda: fk.w4a16_dense(M, N, K, B, scheme=scheme, target=TARGET)
    )
    got = run(lib, [x, qw, kw, wsum, s, *encoding(0.5, zx, 16)], M, N)
    ref = reference_w4a8(x, q, k, s, B, 0.5, zx, bitwidth=16)
    assert np.float32(abs(float(got[0, 0]) / 0.25)) == np.float32(65535 * 128 * K)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32))


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
    asm = tvm.compile(fk.w4a16_dense(M, 48, K, B, target=target), target).mod.inspect_source("asm")
    if scheme == "madd":
        assert "vpmaddwd" in asm and "pmaddubsw" not in asm
    else:
        assert "pmaddubsw" in asm


def test_integer_kernels_reject_what_they_cannot_hold():
    """The zero point is a run-time value: the kernel choice checks it (``encoding_inputs``)."""
    with pytest.raises(ValueError, match="zero point must lie in 0..65535, got 65536"):
        encoding_inputs(ActivationEncoding(16, 0.1, -65536))
    with pytest.raises(ValueError, match="zero point must lie in 0..255, got 256"):
        encoding_inputs(ActivationEncoding(8, 0.1, -256))
    with pytest.raises(ValueError, match="scheme must be 'auto', 'planes' or 'madd', got 'float'"):
        fk.w4a16_dense(1, 64, 64, 64, scheme="float", target=TARGET)
    with pytest.raises(ValueError, match=r"fit int32 up to K = 65536 .* got K=65600"):
        fk.w4a16_dense(1, 64, 65600, 64, target=TARGET)


SCHEMES = [
    ("cascadelake", dict(fold_k=False), "vpdpbusd"),
    ("cascadelake", dict(fold_k=True), "vpdpbusd"),
    ("skylake-avx512", {}, "vpmaddubsw %zmm"),
    ("haswell", {}, "vpmaddubsw %ymm"),
    ("x86-64", {}, None),
    ("x86-64", dict(fold_k=True), None),
]


@pytest.mark.parametrize(("cpu", "options", "instruction"), SCHEMES, ids=str)
@pytest.mark.parametrize("M", [1, 32])
def test_w4a8_rowwise_bit_exact_in_every_scheme(cpu, options, instruction, M):
    """Mode w4a8-dynamic: an encoding per row (rows of any magnitude, of zeros, of one sign), bit-exact."""
    N, K, B = 100, 192, 64
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2})
    rng = np.random.default_rng(M)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rowwise_activations(M, K, rng)
    bias = rng.standard_normal(N).astype(np.float32) if M == 1 else None
    lib = tvm.compile(fk.w4a8_dense(M, N, K, B, bias is not None, target=target, rowwise=True, **options), target)
    if instruction is not None:
        assert instruction in lib.mod.inspect_source("asm").replace("\t", " ")
    packed = fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B)
    sx, zx = RowwiseEncoding().scales(x).reshape(M), RowwiseEncoding().zero_points(x).reshape(M)
    got = run(lib, [x, sx, zx, *packed, s] + ([bias] if bias is not None else []), M, N)
    assert np.array_equal(got.view(np.int32), reference_rowwise(x, q, k, s, B, bias).view(np.int32))


@pytest.mark.parametrize(("cpu", "options", "instruction"), SCHEMES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 32])
@pytest.mark.parametrize("bits", [8, 16])
def test_integer_schemes_and_instruction_sets(cpu, options, instruction, M, bits):
    """Each instruction set gets its dot-product instruction (vpdpbusd; pmaddubsw on zmm or ymm; none
    on plain x86-64), and each scheme is bit-exact at both activation widths where the host can run
    it (a host without AVX-512 checks the AVX-512 code as built, not as run)."""
    check_integer_kernel(cpu, options, instruction, M, bits, N=100, K=192, B=64)


@pytest.mark.parametrize(("cpu", "options", "instruction"), SCHEMES, ids=str)
@pytest.mark.parametrize("B", [8, 16, 24])
def test_integer_blocks_of_one_two_and_three_dwords(cpu, options, instruction, B):
    """Blocks of 8, 16 and 24 k-positions: the block-dot intrinsic sums 1, 2 or 1 dwords in int16, the
    nibble scheme needs two dwords per block (B = 8 takes fold-k instead, and refuses to run without)."""
    if B == 8 and options == dict(fold_k=False):
        with pytest.raises(ValueError, match=r"nibble scheme needs .* \(B >= 16\), got B=8: use fold_k"):
            fk.w4a8_dense(3, 72, 24, 8, target=tvm.target.Target({"kind": "llvm", "mcpu": cpu}), **options)
        return
    check_integer_kernel(cpu, options, instruction, 3, 16 if B == 16 else 8, N=72, K=3 * B, B=B)


@pytest.mark.parametrize(
    ("cpu", "instruction"), [("skylake-avx512", "vpmaddwd %zmm"), ("haswell", "vpmaddwd %ymm"), ("x86-64", None)]
)
@pytest.mark.parametrize("M", [3, 32])
@pytest.mark.parametrize("K", [192, 384])
def test_w4a16_madd_instruction_sets(cpu, instruction, M, K):
    """The madd scheme tensorizes pmaddwd on zmm (AVX512BW) or ymm (AVX2), and is plain vector code on
    x86-64; bit-exact where the host can run it, with acc formed modulo 2^32 (K = 192) or in float64
    from two int32 spans (K = 384)."""
    check_integer_kernel(cpu, dict(scheme="madd"), instruction, M, 16, N=100, K=K, B=64)


def test_w4a16_madd_register_tile_is_one_row_of_the_whole_tile():
    """The madd scheme's register tile is one row by all of a tile's lanes: each row's output is
    written right after its own Q (loops: tiles, rows, then the 64 lanes vectorized), for any row count
    (no padding to a multiple of a row tile)."""
    for M in (49, 64):
        sch = Schedule(fk.w4a16_dense(M, 256, 256, 64, target=ZEN1, scheme="madd"))
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
    for M, decoded in ((TUNING.decoded_min_rows * 8 // bits - 1, False), (TUNING.decoded_min_rows * 8 // bits, True)):
        make = fk.w4a8_dense if bits == 8 else functools.partial(fk.w4a16_dense, scheme="planes")
        script = make(M, 64, 256, 64, target=HASWELL).script()
        assert ('T.sblock("Wq")' in script) == decoded, M


ICELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})  # VNNI: the nibble scheme


@pytest.mark.parametrize("target", [HASWELL, ICELAKE], ids=["block-dot", "nibble"])
@pytest.mark.parametrize("bits", [8, 16])
def test_gemv_prefetches_the_streamed_nibbles(bits, target):
    """An integer kernel of one row group (its rows read the nibbles once, streamed) prefetches them
    ``prefetch_rows`` dword rows ahead; with several row groups (the tile re-read from cache) or a
    decoded tile it does not. Bit-exactness of both is checked above."""
    make = fk.w4a8_dense if bits == 8 else functools.partial(fk.w4a16_dense, scheme="planes")
    rows_per_m = bits // 8
    tune = tuning(target)
    ahead = f"{tune.prefetch_rows}" if target is HASWELL else f"{tune.prefetch_rows * 64}"
    for M, prefetched in (
        (1, True),
        (tune.nibble_rows // rows_per_m, True),
        (12 // rows_per_m, False),
        (tune.decoded_min_rows, False),
    ):
        script = make(M, 64, 256, 64, target=target).script()
        assert ("llvm.prefetch" in script) == prefetched, M
        assert not prefetched or ahead in script
