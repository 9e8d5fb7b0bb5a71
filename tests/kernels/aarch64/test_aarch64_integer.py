"""The aarch64 W4A8 / W4A16 kernels (udot, sdot, usmmla): bit-exact on the emulated board over odd shapes,
saturating inputs and extreme accumulators; chosen only where the target has the instructions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from kernel_cases import SHAPES, activations, reference_rowwise, reference_w4a8, rowwise_activations, weights

from lpbq_tvm.calibration import ActivationEncoding, RowwiseEncoding
from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.kernels.aarch64 import dense_kernel, integer_dense, integer_weights
from lpbq_tvm.kernels.interface import DenseLayer, IntegerArithmetic
from lpbq_tvm.kernels.tiled.integer import encoding_inputs
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.targets import get_target

DOTPROD = get_target("aarch64").tvm_target()
I8MM = get_target("aarch64-i8mm").tvm_target()
PLAIN_NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
pytestmark = pytest.mark.xdist_group("arm64-device")


def _case(M, N, K, B, bits, rng, extreme=False):
    qmax = (1 << bits) - 1
    sx, zx = (0.25, qmax // 2 + 1) if (M + B) % 2 else (0.0371 * 255 / qmax, (0, 17, qmax)[(N + K) % 3])
    if extreme:  # q = -8, k = 16 everywhere and fully saturated x: the largest |acc| the format allows
        q, k = np.full((N, K), -8), np.full((N, K // B), 16)
        x = np.where(np.arange(K) % 2, 1e9, -1e9).astype(np.float32)[None].repeat(M, 0)
    else:
        q, k = weights(N, K, B, rng)
        x = activations(M, K, sx, zx, rng, qmax)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if (M + N + K // B) % 2 else None
    return q, k, s, x, bias, sx, zx


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("M", [1, 3, 8])  # W4A8 takes the nibble scheme below 4 rows, fold-k from there
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_integer_kernel_is_bit_exact_on_the_board(arm64_session, M, N, K, B, bits):
    _check(arm64_session, M, N, K, B, bits, np.random.default_rng(M * 7 + N + K * 3 + B + bits))


@pytest.mark.parametrize("M, bits", [(6, 8), (3, 16)])  # usmmla on 6 rows
@pytest.mark.parametrize("N, K, B", SHAPES)
def test_i8mm_kernel_is_bit_exact_on_the_board(arm64_session, M, N, K, B, bits):
    _check(arm64_session, M, N, K, B, bits, np.random.default_rng(M * 5 + N + K + B + bits), target=I8MM)


@pytest.mark.parametrize("N, K, B", SHAPES[::5])
def test_an_odd_row_count_keeps_fold_k_on_i8mm_and_is_bit_exact(arm64_session, N, K, B):
    _check(arm64_session, 5, N, K, B, 8, np.random.default_rng(N + K + B), target=I8MM)


@pytest.mark.parametrize("target", [DOTPROD, I8MM], ids=["dotprod", "i8mm"])
@pytest.mark.parametrize("N", [20, 40])
@pytest.mark.parametrize("bits", [8, 16])
def test_partial_tiles_of_fewer_lanes_than_a_register_tile(arm64_session, bits, N, target):
    """One channel tile of 20 or 40 lanes: the register tiles narrow to 4 or 8 lanes."""
    _check(arm64_session, 8, N, 256, 64, bits, np.random.default_rng(N + bits), target=target)


@pytest.mark.parametrize("target", [DOTPROD, I8MM], ids=["dotprod", "i8mm"])
@pytest.mark.parametrize("M", [2, 8])
@pytest.mark.parametrize("bits", [8, 16])
def test_extreme_accumulators_are_exact_on_the_board(arm64_session, bits, M, target):
    _check(arm64_session, M, 100, 512, 128, bits, np.random.default_rng(bits), extreme=True, target=target)


@pytest.mark.parametrize(("M", "target"), [(1, DOTPROD), (5, DOTPROD), (6, I8MM)], ids=["udot", "fold-k", "usmmla"])
def test_rowwise_scales_are_bit_exact_on_the_board(arm64_session, M, target):
    """w4a8-dynamic: an encoding per row (rows of 1e-3..1e3, of zeros, of one sign) in each scheme."""
    N, K, B = 100, 192, 64
    rng = np.random.default_rng(M)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = rowwise_activations(M, K, rng)
    bias = rng.standard_normal(N).astype(np.float32) if M == 1 else None
    func = integer_dense(M, N, K, B, 8, bias is not None, target=target, rowwise=True)
    packed = integer_weights(M, N, K, B, 8, pack_nibbles(q), pack_nibbles(k - 1), target)
    sx, zx = RowwiseEncoding().scales(x).reshape(M), RowwiseEncoding().zero_points(x).reshape(M)
    got = arm64_session.call(func, target, [x, sx, zx, *packed, s, *([bias] if bias is not None else [])], (M, N))
    np.testing.assert_array_equal(got.view(np.int32), reference_rowwise(x, q, k, s, B, bias).view(np.int32))


def _check(arm64_session, M, N, K, B, bits, rng, extreme=False, target=DOTPROD):
    q, k, s, x, bias, sx, zx = _case(M, N, K, B, bits, rng, extreme)
    func = integer_dense(M, N, K, B, bits, bias is not None, target=target)
    weights_ = integer_weights(M, N, K, B, bits, pack_nibbles(q), pack_nibbles(k - 1), target)
    encoding = encoding_inputs(ActivationEncoding(bits, sx, -zx)).values()
    got = arm64_session.call(func, target, [x, *weights_, s, *encoding, *([bias] if bias is not None else [])], (M, N))
    expected = reference_w4a8(x, q, k, s, B, sx, zx, bias, bitwidth=bits)
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize(
    "M, target, instruction, absent",
    [
        (1, DOTPROD, "udot", "sdot"),
        (8, DOTPROD, "sdot", "usmmla"),
        (8, I8MM, "usmmla", "sdot"),
        (5, I8MM, "sdot", "usmmla"),
    ],
)
def test_the_schemes_run_on_their_instructions(M, target, instruction, absent):
    """The nibble scheme (few rows) on udot, fold-k (from four rows) on sdot, with i8mm usmmla on row pairs."""
    asm = tvm.compile(integer_dense(M, 64, 256, 64, 8, target=target), target).mod.inspect_source("asm")
    assert instruction in asm and absent not in asm


@pytest.mark.parametrize(("N", "byte_shifts"), [(64, False), (48, True)], ids=["whole-tile", "partial-tile"])
def test_whole_tiles_take_lane_pairs_which_shift_no_bytes(N, byte_shifts):
    """Lane pairs need one ``and`` per load where the nibble scheme (a layer of one partial tile) also
    shifts each loaded byte right by four."""
    asm = tvm.compile(integer_dense(1, N, 256, 64, 8, target=DOTPROD), DOTPROD).mod.inspect_source("asm")
    assert "udot" in asm and bool(re.search(r"ushr\tv\d+\.16b, v\d+\.16b, #4", asm)) == byte_shifts


def test_fold_k_takes_each_half_of_its_codes_from_a_lane():
    """Fold-k loads a row's eight codes of a k-step once: each ``sdot`` reads its four by element
    (``v.4b[0]``, ``v.4b[1]``), none from a whole register of codes broadcast for it."""
    asm = tvm.compile(integer_dense(8, 64, 256, 64, 8, target=DOTPROD), DOTPROD).mod.inspect_source("asm")
    by_lane = set(re.findall(r"sdot\tv\d+\.4s, v\d+\.16b, v\d+\.4b\[(\d)\]", asm))
    assert by_lane == {"0", "1"} and not re.search(r"sdot\tv\d+\.4s, v\d+\.16b, v\d+\.16b", asm)


def test_the_family_serves_weight_only_layers_and_integer_ones_on_cpus_with_the_dot_product():
    rng = np.random.default_rng(0)
    encoding = encode_lpbq(rng.standard_normal((64, 256)).astype(np.float32), channel_axis=0, block_axis=1)
    integer = IntegerArithmetic(ActivationEncoding(8, 0.1, -3))
    layer = DenseLayer(rows=1, depth=256, encoding=encoding, has_bias=False, integer=integer)
    choice = dense_kernel(layer, DOTPROD)
    assert choice is not None and set(choice.weights) == {
        "lpbq_qw",
        "lpbq_kw",
        "lpbq_wsum",
        "lpbq_s",
        "lpbq_sx",
        "lpbq_zx",
    }
    assert dense_kernel(layer, PLAIN_NEON) is None  # no udot: the generic kernel
    weight_only = DenseLayer(1, 256, encoding, False, None)  # plain NEON is enough
    for target in (DOTPROD, PLAIN_NEON):
        assert set(dense_kernel(weight_only, target).weights) == {"lpbq_qw", "lpbq_kw", "lpbq_s"}
    requantized = IntegerArithmetic(integer.input_encoding, ActivationEncoding(8, 0.2, -100))
    assert dense_kernel(DenseLayer(1, 256, encoding, False, requantized), DOTPROD) is None
    assert dense_kernel(layer, get_target("cpu").tvm_target()) is None
