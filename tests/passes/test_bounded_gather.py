"""BoundedGather: gathers by run-time indices clamp them: valid indices (negative ones included, as ONNX
defines them) give onnxruntime's values bit for bit, an index past the table reads its last row instead of
memory outside it, and TVM no longer warns of segfaults; constant indices keep their mode."""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from ir import relax_calls
from onnx import TensorProto, helper, numpy_helper
from tvm.script import relax as R

from lpbq_tvm.compiler import build
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.bounded_gather import BoundedGather

TABLE = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)


def _embedding() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 5, 4])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_valid_indices_equal_onnxruntime_and_an_index_past_the_table_reads_its_last_row(capfd):
    imported = import_onnx(_embedding())
    modes = [str(call.attrs.mode) for call in relax_calls(imported.mod, "relax.take")]
    assert "clip" in modes and "fast" not in modes
    compiled = build(imported.mod)
    assert "Fast mode segfaults" not in capfd.readouterr().err
    ids = np.array([[0, 9, -1, -10, 3]])
    (rows,) = compiled.run({"ids": ids}).values()
    import onnxruntime as ort

    (expected,) = ort.InferenceSession(_embedding().SerializeToString()).run(None, {"ids": ids})
    np.testing.assert_array_equal(rows.view(np.int32), expected.view(np.int32))
    (rows,) = compiled.run({"ids": np.array([[10**9, 0, 1, 2, 3]])}).values()
    np.testing.assert_array_equal(rows[0, 0], TABLE[-1])


def test_constant_indices_keep_their_mode():
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((10, 4), "float32")):
            with R.dataflow():
                y = R.take(x, R.const(np.array([1, 2], "int64")), axis=0, mode="fast")
                R.output(y)
            return y

    assert [str(c.attrs.mode) for c in relax_calls(BoundedGather()(Module), "relax.take")] == ["fast"]
