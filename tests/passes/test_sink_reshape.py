"""SinkReshape: elementwise ops after a reshape that keeps the last axis move above it, with
operands that vary along that axis only; the values stay bit-identical. Others stay where they are."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.passes.sink_reshape import SinkReshape

RNG = np.random.default_rng(0)
MEAN = RNG.standard_normal((1, 1, 3, 4)).astype(np.float32)  # varies along more than the last axis
GAIN = RNG.standard_normal((1, 1, 1, 4)).astype(np.float32)


@tvm.script.ir_module
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


def _ops(mod: tvm.IRModule) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, result shape) of each call in ``main``, in order."""
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append((e.op.name, tuple(int(d) for d in e.ty.shape)))
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
            else None
        ),
    )
    return found


def test_the_elementwise_chain_runs_before_the_reshape():
    sunk = SinkReshape()(Module)
    assert _ops(sunk) == [
        ("relax.multiply", (6, 4)),
        ("relax.add", (6, 4)),
        ("relax.clip", (6, 4)),
        ("relax.multiply", (6, 4)),
        ("relax.reshape", (1, 2, 3, 4)),
        ("relax.subtract", (1, 2, 3, 4)),
        ("relax.add", (1, 2, 3, 4)),
    ]


def test_the_values_stay_bit_identical():
    inputs = {
        "x": RNG.standard_normal((6, 4)).astype(np.float32) * 4,
        "skip": RNG.standard_normal((1, 2, 3, 4)).astype(np.float32),
    }
    before = build(Module).run(inputs)["output0"]
    after = build(SinkReshape()(Module)).run(inputs)["output0"]
    np.testing.assert_array_equal(after, before)


def test_a_reshape_that_changes_the_last_axis_stays_above_its_ops():
    @tvm.script.ir_module
    class Regrouped:
        @R.function
        def main(x: R.Tensor((6, 4), "float32")):
            with R.dataflow():
                y = R.reshape(x, R.shape([1, 3, 8]))
                out = R.nn.relu(R.multiply(y, R.const(2.0, "float32")))
                R.output(out)
            return out

    assert _ops(SinkReshape()(Regrouped)) == _ops(Regrouped)
