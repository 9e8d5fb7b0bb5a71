"""AffineBatchNorm: inference batch norms with constant parameters become ``x * a + b`` per channel,
within the error bound the module states; a batch norm with a run-time parameter stays."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import relax_calls
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.affine_batch_norm import AffineBatchNorm

EPS = 1e-3
RNG = np.random.default_rng(0)
GAMMA, BETA, MEAN = (RNG.standard_normal(8).astype(np.float32) for _ in range(3))
VAR = RNG.uniform(0.01, 4, 8).astype(np.float32)
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


def _module(axis: int, shape: tuple, center: bool = True, scale: bool = True, dtype: str = "float32"):
    gamma, beta, mean, var = (p.astype(dtype) for p in (GAMMA, BETA, MEAN, VAR))

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(shape, dtype)):
            with R.dataflow():
                normalized = R.nn.batch_norm(
                    x,
                    R.const(gamma),
                    R.const(beta),
                    R.const(mean),
                    R.const(var),
                    axis=axis,
                    epsilon=EPS,
                    center=center,
                    scale=scale,
                    training=False,
                )
                out = R.nn.relu(normalized[0])
                R.output(out)
            return out

    return Module


def _exact(x: np.ndarray, axis: int, center: bool = True, scale: bool = True) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    g, b, m, v = (p.astype(np.float64).reshape(shape) for p in (GAMMA, BETA, MEAN, VAR))
    return (x - m) / np.sqrt(v + np.float32(EPS)) * (g if scale else 1) + (b if center else 0)


@pytest.mark.parametrize(("axis", "shape", "const_shape"), [(3, (2, 5, 5, 8), (8,)), (1, (2, 8, 5, 5), (8, 1, 1))])
def test_a_batch_norm_becomes_one_scale_and_one_shift_rounded_from_float64(axis, shape, const_shape):
    """The normalized value is ``x * a + b`` with ``a``, ``b`` from float64, shaped along the axis; the
    tuple the batch norm returned keeps its moving statistics."""
    scale = GAMMA.astype(np.float64) / np.sqrt(VAR.astype(np.float64) + np.float32(EPS))
    shift = BETA.astype(np.float64) - MEAN.astype(np.float64) * scale
    a, b = (v.astype(np.float32).reshape(const_shape) for v in (scale, shift))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(shape, "float32")):
            with R.dataflow():
                scaled = R.multiply(x, R.const(a))
                shifted = R.add(scaled, R.const(b))
                normalized = (shifted, R.const(MEAN), R.const(VAR))
                out = R.nn.relu(normalized[0])
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(AffineBatchNorm()(_module(axis, shape)), Expected)


def test_the_scale_and_shift_take_the_data_dtype():
    rewritten = AffineBatchNorm()(_module(3, (2, 5, 5, 8), dtype="float16"))
    (multiply,), (add,) = relax_calls(rewritten, "relax.multiply"), relax_calls(rewritten, "relax.add")
    assert multiply.args[1].value.numpy().dtype == add.args[1].value.numpy().dtype == np.float16
    assert str(rewritten["main"].ret_ty.dtype) == "float16"


def test_a_batch_norm_with_a_run_time_parameter_or_in_training_stays():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), gamma: R.Tensor((8,), "float32")):
            with R.dataflow():
                by_parameter = R.nn.batch_norm(
                    x, gamma, R.const(BETA), R.const(MEAN), R.const(VAR), axis=1, epsilon=EPS, training=False
                )
                trained = R.nn.batch_norm(
                    x, R.const(GAMMA), R.const(BETA), R.const(MEAN), R.const(VAR), axis=1, epsilon=EPS, training=True
                )
                out = R.add(by_parameter[0], trained[0])
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(AffineBatchNorm()(Before), Before)


@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
def test_compiled_batch_norms_are_within_the_stated_bound_of_the_exact_ones(center, scale):
    """``x * a + b`` with ``a``, ``b`` rounded once: within ``2^-24 (2 |x a| + |b| + |y|)`` of the
    exact batch norm (ReLU after it does not widen the error)."""
    x = (RNG.standard_normal((2, 5, 5, 8)) * 10.0 ** RNG.integers(-2, 3, (2, 5, 5, 8))).astype(np.float32)
    rewritten = AffineBatchNorm()(_module(3, x.shape, center, scale))
    out = build(rewritten, pipeline=PLAIN).run({"x": x})["output0"].astype(np.float64)
    exact = _exact(x.astype(np.float64), 3, center, scale)
    scale_ = (GAMMA if scale else 1) / np.sqrt(VAR.astype(np.float64) + np.float32(EPS))
    shift = (BETA if center else 0) - MEAN * scale_
    bound = 2.0**-24 * (2 * np.abs(x * scale_) + np.abs(shift) + np.abs(exact))
    assert np.all(np.abs(out - np.maximum(exact, 0)) <= bound * (1 + 2.0**-20))  # (+ second-order terms)
