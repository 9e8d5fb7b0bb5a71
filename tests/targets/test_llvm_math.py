"""The math intrinsics :mod:`lpbq_tvm.targets.llvm_math` makes lowerable compile, vectorized and in float16,
and compute what the C library does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from lpbq_tvm.targets import get_target

# op -> (numpy float64 reference, input range)
OPS = {
    "sinh": (np.sinh, (-5.0, 5.0)),
    "cosh": (np.cosh, (-5.0, 5.0)),
    "asin": (np.arcsin, (-0.99, 0.99)),
    "acos": (np.arccos, (-0.99, 0.99)),
    "atan": (np.arctan, (-5.0, 5.0)),
    "asinh": (np.arcsinh, (-5.0, 5.0)),
    "acosh": (np.arccosh, (1.01, 5.0)),
    "atanh": (np.arctanh, (-0.99, 0.99)),
    "erf": (np.vectorize(math.erf), (-3.0, 3.0)),
}


def _unary(op: str, dtype: str, size: int = 67) -> tvm.IRModule:
    """``op`` over a vector whose length is no multiple of a vector width (a vectorized tail)."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((size,), dtype))
    with builder.function("main", [x]):
        builder.emit_func_output(builder.emit(getattr(relax.op, op)(x)))
    return builder.get()


def _run(op: str, dtype: str, x: np.ndarray) -> np.ndarray:
    cpu = get_target("cpu")
    target = cpu.tvm_target()
    executable = tvm.compile(_unary(op, dtype, x.size), target=target, relax_pipeline=cpu.pipeline(target))
    vm = relax.VirtualMachine(executable, cpu.device())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _inputs(op: str, dtype: str) -> np.ndarray:
    low, high = OPS[op][1]
    return np.random.default_rng(0).uniform(low, high, 67).astype(dtype)


@pytest.mark.parametrize("op", ["sinh", "cosh"])
def test_sinh_and_cosh_compile_in_vectorized_loops(op):
    """TVM marks them vectorizable but lowers them only to scalar C calls: the elementwise schedule
    vectorizes, so this failed with "unknown intrinsic". glibc's sinhf / coshf are within 2 ulp."""
    x = _inputs(op, "float32")
    actual = _run(op, "float32", x)
    expected = OPS[op][0](x.astype(np.float64))
    assert (np.abs(actual - expected) <= 2 * np.spacing(np.abs(expected).astype(np.float32))).all()


@pytest.mark.parametrize("op", list(OPS))
def test_float16_intrinsics_are_computed_in_float32(op):
    """No C function takes float16: computed in float32 (an error far below a float16 ulp, 2^-13 of
    it for a function within one float32 ulp) and rounded to float16 (half an ulp)."""
    x = _inputs(op, "float16")
    actual = _run(op, "float16", x).astype(np.float64)
    expected = OPS[op][0](x.astype(np.float64))
    assert (np.abs(actual - expected) <= np.spacing(np.abs(expected).astype(np.float16))).all()


def test_aarch64_code_generation_takes_them_too():
    aarch64 = get_target("aarch64")
    target = aarch64.tvm_target()
    for op in ("sinh", "cosh"):
        for dtype in ("float32", "float16"):
            tvm.compile(_unary(op, dtype), target=target, relax_pipeline=aarch64.pipeline(target))
