"""LSTM, GRU and RNN: TVM 0.27's Relax ONNX importer converts none of them, so the product refuses
such a model at once, in one line naming the op and its nodes, instead of failing later."""

from __future__ import annotations

import numpy as np
import pytest
from harness import rng
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm import QuantizationSimModel
from lpbq_tvm.frontend import ModelImportError

T, BATCH, K, H = 5, 2, 8, 6


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_layers_are_refused_up_front(op, gates):
    generator = rng(0)
    weights = {
        "w": generator.standard_normal((1, gates * H, K)),
        "r": generator.standard_normal((1, gates * H, H)),
        "b": generator.standard_normal((1, 2 * gates * H)),
    }
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w", "r", "b"], ["y"], name=f"{op.lower()}_layer", hidden_size=H)],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, BATCH, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 1, BATCH, H])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ModelImportError) as error:
        QuantizationSimModel(model)
    assert str(error.value) == f"TVM's ONNX importer does not support: {op} (nodes: {op.lower()}_layer)"
