"""LowerLPBQ with an x86 target: 2-D dense layers take the scheduled kernels and compute the same results."""

from __future__ import annotations

import numpy as np
import pytest
from model_builders import LAYER_CASES, assert_float_close, dot_product_bound, layer_model
from tvm import relax

from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges
from lpbq_tvm.targets import aarch64, cpu

DENSE_2D = [case for case in LAYER_CASES if case.op_type != "Conv" and len(case.x_shape) == 2]


def _encoded(case):
    mod = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(import_onnx(layer_model(case, seed=4)).mod))
    return attach_activation_ranges(mod, {"w": {"input": (-1.5, 2.0)}})


def _kernels(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        mod["main"].body,
        lambda e: (
            names.append(e.args[0].name_hint) if isinstance(e, relax.Call) and e.op.name == "relax.call_tir" else None
        ),
    )
    return names


@pytest.mark.parametrize("case", DENSE_2D, ids=lambda c: c.name)
def test_w4a8_scheduled_kernel_equals_the_generic_one_bit_for_bit(case):
    encoded = _encoded(case)
    fast = LowerLPBQ("w4a8", target=cpu.tvm_target())(encoded)
    generic = LowerLPBQ("w4a8")(encoded)
    assert _kernels(fast) == ["lpbq_dense_x86"] and _kernels(generic) == ["lpbq_dense"]
    x = {"x": (np.random.default_rng(1).standard_normal(case.x_shape) * 2).astype(np.float32)}
    (a,) = build(fast).run(x).values()
    (b,) = build(generic).run(x).values()
    np.testing.assert_array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("case", DENSE_2D, ids=lambda c: c.name)
def test_weight_only_scheduled_kernel_within_the_float_bound(case):
    encoded = _encoded(case)
    fast = LowerLPBQ("weight-only", target=cpu.tvm_target())(encoded)
    assert _kernels(fast) == ["lpbq_dense_x86"]
    assert {p.name for p in fast["main"].params} >= {"w.lpbq_qw", "w.lpbq_kw", "w.lpbq_s"}
    x = np.random.default_rng(2).standard_normal(case.x_shape).astype(np.float32)
    (actual,) = build(fast).run({"x": x}).values()
    (reference,) = build(LowerLPBQ("weight-only")(encoded)).run({"x": x}).values()
    qdq = read_encodings(encoded["main"])["w"].qdq_weight
    assert_float_close(actual, reference, dot_product_bound(case, x, qdq))


def test_other_layers_and_targets_keep_the_generic_kernels():
    """3-D activations, requantized outputs, 16-bit activations and non-x86 targets are not scheduled here."""
    matmul_3d = next(case for case in LAYER_CASES if len(case.x_shape) == 3)
    assert _kernels(LowerLPBQ("w4a8", target=cpu.tvm_target())(_encoded(matmul_3d))) == ["lpbq_dense"]
    encoded = _encoded(DENSE_2D[0])
    assert _kernels(LowerLPBQ("w4a16", target=cpu.tvm_target())(encoded)) == ["lpbq_dense"]
    assert _kernels(LowerLPBQ("weight-only", target=aarch64.tvm_target())(encoded)) == ["lpbq_dense"]
