"""Every Relax rewrite of the CPU pipeline, applied alone to small models around convs (rank 0 to 5,
float32 and float16), computes what the module computed without it, within float tolerance.

Each pass runs on the imported module after ``FoldConstant`` (the constants it matches are folded
by then in the pipeline); both modules are built with TVM's own lowering, so the rewrite is the
only difference. The tolerance is ``conv_cases.TOLERANCE`` of max |y| (reordered float sums
stay two orders of magnitude below it, a misplaced value above it); per pass, at least one model
must actually be rewritten, or the test would check nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm_ffi
from conv_cases import CASES, TOLERANCE, model_case
from tvm import relax

from lpbq_tvm.compiler import build
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.affine_batch_norm import AffineBatchNorm
from lpbq_tvm.passes.reciprocal_division import ReciprocalDivision
from lpbq_tvm.passes.sigmoid_by_exp import SigmoidByExp
from lpbq_tvm.passes.sink_reshape import SinkReshape
from lpbq_tvm.passes.widen_float16_math import WidenFloat16Math

REWRITES = {
    "AffineBatchNorm": AffineBatchNorm,
    "ReciprocalDivision": ReciprocalDivision,
    "SigmoidByExp": SigmoidByExp,
    "SinkReshape": SinkReshape,
    "WidenFloat16Math": WidenFloat16Math,
}
PLAIN = "default_build"
# TVM's own default_build cannot build a float16 batch norm (its decomposition mixes in float32),
# with or without a rewrite; the CPU pipeline can (tests/passes/test_channels_last.py runs it)
UNBUILDABLE_BY_TVM = {("batch_norm", "float16")}


@pytest.fixture(scope="module")
def imported():
    cache = {}

    def load(case, dtype):
        if (case, dtype) not in cache:
            model = import_onnx(model_case(case, dtype))
            cache[case, dtype] = (model, relax.transform.FoldConstant()(model.mod))
        return cache[case, dtype]

    return load


@pytest.mark.parametrize("rewrite", REWRITES)
def test_a_rewrite_keeps_the_values_of_every_model_it_changes(rewrite, imported):
    changed = []
    for case, dtype in CASES:
        if (case, dtype) in UNBUILDABLE_BY_TVM:
            continue
        model, folded = imported(case, dtype)
        rewritten = REWRITES[rewrite]()(folded)
        if tvm_ffi.structural_equal(rewritten, folded):
            continue
        changed.append((case, dtype))
        x = {"x": np.random.default_rng(2).standard_normal(model.inputs[0].shape).astype(dtype)}
        infos = {"inputs": model.inputs, "outputs": model.outputs, "pipeline": PLAIN}
        before = build(folded, **infos).run(x)["y"].astype(np.float64)
        after = build(rewritten, **infos).run(x)["y"].astype(np.float64)
        assert not np.isnan(after).any(), (case, dtype)
        tolerance = TOLERANCE[dtype] * np.abs(before).max()
        np.testing.assert_allclose(after, before, rtol=0, atol=tolerance, err_msg=f"{case} {dtype}")
    assert changed, f"{rewrite} rewrote none of the models"
