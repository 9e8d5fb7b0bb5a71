"""What the x86 kernel tests share: compile and run helpers, targets, the kernels by mode (kernel_cases: the rest)."""

from __future__ import annotations

import numpy as np
import tvm
from kernel_cases import activations, reference_w4a8, weights
from tvm.target import codegen

from lpbq_tvm.calibration import ActivationEncoding
from lpbq_tvm.kernels import x86 as fk
from lpbq_tvm.kernels.tiled.integer import encoding_inputs
from lpbq_tvm.packing import pack_nibbles
from lpbq_tvm.targets import get_target

TARGET = get_target("cpu").tvm_target()
DEV = tvm.cpu()
_COMPILED: dict = {}
ZEN1, HASWELL = (tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2}) for cpu in ("znver1", "haswell"))


def compiled(key, make):
    if key not in _COMPILED:
        _COMPILED[key] = tvm.compile(make(), TARGET)
    return _COMPILED[key]


def encoding(sx: float, zx: int, bits: int = 8) -> list[np.ndarray]:
    """The run-time ``sx`` and ``zx`` arguments of an integer kernel."""
    return list(encoding_inputs(ActivationEncoding(bits, sx, -zx)).values())


def run(lib, arrays, M, N):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), DEV) for a in arrays]
    out = tvm.runtime.tensor(np.zeros((M, N), np.float32), DEV)
    lib(*args, out)
    return out.numpy()


KERNELS = {
    "weight-only": lambda M, N, target: fk.weight_only_dense(M, N, 256, 64, target=target),
    "w4a8": lambda M, N, target: fk.w4a8_dense(M, N, 256, 64, target=target),
    "w4a16 planes": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, target=target, scheme="planes"),
    "w4a16 madd": lambda M, N, target: fk.w4a16_dense(M, N, 256, 64, target=target, scheme="madd"),
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
    lib = tvm.compile(kernel(M, N, K, B, target=target, **options), target)
    asm = lib.mod.inspect_source("asm").replace("\t", " ")
    if instruction is None:
        assert "vpdpbusd" not in asm and "pmaddubsw" not in asm
    else:
        assert instruction in asm
    if host_runs(target):
        got = run(
            lib, [x, *fk.repack_w4a8(pack_nibbles(q), pack_nibbles(k - 1), N, K, B), s, *encoding(sx, zx, bits)], M, N
        )
        ref = reference_w4a8(x, q, k, s, B, sx, zx, bitwidth=bits)
        assert np.array_equal(got.view(np.int32), ref.view(np.int32))
