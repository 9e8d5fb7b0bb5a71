"""A small built-in ONNX model with one Conv, one Gemm and one MatMul, made in code.

Used by ``lpbq-tvm demo`` and the tests: every weight's input-channel length is a multiple of
64, so with the default block size all three layers take LPBQ.

    x[1, 64, 8, 8] -> Conv(128, 3x3, pad 1) + bias -> Relu -> GlobalAveragePool -> Flatten
      -> Gemm(transB=1, 256) + bias -> Relu -> MatMul(W[256, 64]) -> y[1, 64]
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_example_model"]

EXAMPLE_INPUT = "x"
EXAMPLE_INPUT_SHAPE = (1, 64, 8, 8)


def build_example_model(seed: int = 0) -> onnx.ModelProto:
    """The example model with seeded Gaussian weights (He-scaled so activations stay O(1))."""
    rng = np.random.default_rng(seed)

    def gaussian(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    initializers = {
        "conv.weight": gaussian((128, 64, 3, 3), 64 * 9),
        "conv.bias": gaussian((128,), 64),
        "fc1.weight": gaussian((256, 128), 128),
        "fc1.bias": gaussian((256,), 128),
        "fc2.weight": gaussian((256, 64), 256),
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv.weight", "conv.bias"], ["conv_out"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["conv_out"], ["relu1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["relu1"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu2"], name="relu2"),
        helper.make_node("MatMul", ["relu2", "fc2.weight"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "lpbq_example",
        [helper.make_tensor_value_info(EXAMPLE_INPUT, TensorProto.FLOAT, list(EXAMPLE_INPUT_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lpbq_tvm")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
