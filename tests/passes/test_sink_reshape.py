"""SinkReshape: elementwise ops after a reshape that keeps the last axis move above it, with
operands that vary along that axis only; the values stay bit-identical. Others stay where they are."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.sink_reshape import SinkReshape

RNG = np.random.default_rng(0)
MEAN = RNG.standard_normal((1, 1, 3, 4)).astype(np.float32)  # varies along more than the last axis
GAIN = RNG.standard_normal((1, 1, 1, 4)).astype(np.float32)
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


@I.ir_module
class Module:
    @R.function
    def main(x: R.Tensor((6, 4), "float32"), skip: R.Tensor((1, 2, 3, 4), "float32")):
        with R.dataflow():
            y = R.reshape(x, R.shape([1, 2, 3, 4]))
            scaled = R.multiply(y, R.const(GAIN))
            shifted = R.add(scaled, R.const(3.0, "float32"))
            clipped = R.clip(shifted, 0, 6)
            swish = R.multiply(scaled, clipped)  # both operands reshaped: the chain continues
            centered = R.subtract(swish, R.const(MEAN))  # not along the last axis only: stays
            out = R.add(centered, skip)
            R.output(out)
        return out


def test_the_elementwise_chain_runs_before_the_reshape():
    """The chain runs on ``x``'s shape, its constant along the last axis reshaped to that axis; the reshape
    moves below it, where the subtraction (varying along two axes) stops it."""

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((6, 4), "float32"), skip: R.Tensor((1, 2, 3, 4), "float32")):
            with R.dataflow():
                scaled = R.multiply(x, R.const(GAIN.reshape(4)))
                shifted = R.add(scaled, R.const(3.0, "float32"))
                clipped = R.clip(shifted, 0, 6)
                swish = R.multiply(scaled, clipped)
                y = R.reshape(swish, R.shape([1, 2, 3, 4]))
                centered = R.subtract(y, R.const(MEAN))
                out = R.add(centered, skip)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(SinkReshape()(Module), Expected)


def test_the_values_stay_bit_identical():
    inputs = {
        "x": RNG.standard_normal((6, 4)).astype(np.float32) * 4,
        "skip": RNG.standard_normal((1, 2, 3, 4)).astype(np.float32),
    }
    before = build(Module, pipeline=PLAIN).run(inputs)["output0"]
    after = build(SinkReshape()(Module), pipeline=PLAIN).run(inputs)["output0"]
    np.testing.assert_array_equal(after, before)


def test_a_reshape_that_changes_the_last_axis_stays_above_its_ops():
    @I.ir_module
    class Regrouped:
        @R.function
        def main(x: R.Tensor((6, 4), "float32")):
            with R.dataflow():
                y = R.reshape(x, R.shape([1, 3, 8]))
                scaled = R.multiply(y, R.const(2.0, "float32"))
                out = R.nn.relu(scaled)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(SinkReshape()(Regrouped), Regrouped)
