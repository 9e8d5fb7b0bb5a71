"""The layer the kernel benchmarks measure: one MatMul ``y[M, N] = x[M, K] · w[K, N]``, quantized with LPBQ.

``dense_layer(n, k, m, rng)`` returns the ONNX model, its fp32 weight, a random input, and the LPBQ
simulation (block size 64) calibrated on that input. Used by ``bench_kernels.py`` and ``bench_aarch64.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights


def dense_layer(n: int, k: int, m: int, rng: np.random.Generator):
    """(model, weight [K, N], inputs {"x": [M, K]}, calibrated simulation)."""
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model: onnx.ModelProto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings(lambda s, data: s.run(data), x)
    return model, weight, x, sim
