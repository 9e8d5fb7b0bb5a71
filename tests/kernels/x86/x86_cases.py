"""What the x86 kernel tests share: references, weights and activations, compile and run helpers, targets.

weight-only: within float-reassociation tolerance of a float64 reference;
W4A8 / W4A16: bit-exact (np.array_equal on the int32 views of the float32 outputs) against numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.target import codegen

from lpbq_tvm import reference
from lpbq_tvm.calibration import ActivationEncoding
from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.targets import get_target


def reference_weight_only(x, q, k, s, B, bias=None):
    """float64 reference ``s[n] · Σ_i x · q · k (+ bias)``; q [N, K], k [N, nb]."""
    w = q.astype(np.float64) * np.repeat(k, B, axis=1)
    y = (x.astype(np.float64) @ w.T) * s.astype(np.float64)
    return y if bias is None else y + bias.astype(np.float64)


def reference_w4a8(x, q, k, s, B, sx, zx, bias=None, bitwidth=8):
    """The project's integer reference (lpbq_tvm.reference) for a ``bitwidth`` input encoding (sx, zx)."""
    encoding = ActivationEncoding(bitwidth, float(np.float32(sx)), -int(zx))
    return reference.dense_int(x, reference.int_weight(q, k, B), s, encoding, bias)


TARGET = get_target("cpu").tvm_target()
DEV = tvm.cpu()
_COMPILED: dict = {}
ZEN1, HASWELL = (tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2}) for cpu in ("znver1", "haswell"))
SHAPES = [(N, nb * B, B) for N in (48, 100) for B in (32, 64, 128) for nb in (1, 3)]


def compiled(key, make):
    if key not in _COMPILED:
        _COMPILED[key] = tvm.compile(make(), TARGET)
    return _COMPILED[key]


def weights(N, K, B, rng, edge=True):
    """Random q in -8..7, k in 1..16; a few rows at the extremes (q = -8 & k = 16, q = 7, q = 0)."""
    q = rng.integers(-8, 8, (N, K))
    k = rng.integers(1, 17, (N, K // B))
    if edge:
        q[0], k[0] = -8, 16
        q[1 % N], k[1 % N] = 7, 16
        q[2 % N] = 0
        q[-1, ::2], k[-1] = -8, 1
    return q, k


def run(lib, arrays, M, N):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), DEV) for a in arrays]
    out = tvm.runtime.tensor(np.zeros((M, N), np.float32), DEV)
    lib(*args, out)
    return out.numpy()


def weight_only_tolerance(x, q, k, s, B, bias):
    """(K + nb + 3) · 2^-24 · (Σ|x||w|·|s| + |bias|): float32 reassociation + the scale / bias roundings."""
    K = x.shape[1]
    w = np.abs(q).astype(np.float64) * np.repeat(k, B, axis=1)
    mag = (np.abs(x).astype(np.float64) @ w.T) * np.abs(s)
    if bias is not None:
        mag = mag + np.abs(bias)
    return (K + K // B + 3) * 2.0**-24 * mag


def activations(M, K, sx, zx, rng, qmax=255):
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


KERNELS = {
    "weight-only": lambda M, N, target: fk.weight_only_dense(M, N, 256, 64, target=target),
    "w4a8": lambda M, N, target: fk.w4a8_dense(M, N, 256, 64, 0.1, 3, target=target),
    "w4a16 planes": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, 0.1, 3, target=target, scheme="planes"),
    "w4a16 madd": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, 0.1, 3, target=target, scheme="madd"),
}


_FEATURES = ("avx512vnni", "avx512bw", "avx512f", "avx2")


def host_runs(target) -> bool:
    """Whether the host CPU has every vector feature of ``target`` (so it can run code built for it)."""
    return all(codegen.target_has_features(f, TARGET) for f in _FEATURES if codegen.target_has_features(f, target))


def check_integer_kernel(cpu, options, instruction, M, bits, N, K, B):
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2})
    qmax = (1 << bits) - 1
    sx, zx = 0.0371 * 255 / qmax, 100 * qmax // 255
    rng = np.random.default_rng(M + bits + B)
    q, k = weights(N, K, B, rng)
    s = rng.uniform(1e-3, 1e-1, N).astype(np.float32)
    x = activations(M, K, sx, zx, rng, qmax)
    kernel = fk.w4a8_dense if bits == 8 else fk.w4a16_dense
    lib = tvm.compile(kernel(M, N, K, B, sx, zx, target=target, **options), target)
    asm = lib.mod.inspect_source("asm").replace("\t", " ")
    if instruction is None:
        assert "vpdpbusd" not in asm and "pmaddubsw" not in asm
    else:
        assert instruction in asm
    if host_runs(target):
        got = run(lib, [x, *fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B), s], M, N)
        ref = reference_w4a8(x, q, k, s, B, sx, zx, bitwidth=bits)
        assert np.array_equal(got.view(np.int32), ref.view(np.int32))
