"""The QNN export on Qualcomm's own HTP runtime (the onnxruntime-qnn simulator), CPU fallback disabled.

Compares output codes with the htp-sim target: within 2 LSB for uint8 activations and within 1
LSB per requantization for uint16 (docs/design.md §5): 1 for a MatMul, 2 for a Gemm with bias, whose
product is requantized before the bias add too. Over several uint16 layers the differences
compound, and the HTP's 16-bit Conv rounds with a bias of about -0.15 code that a following
average pool accumulates; those are not fair uint16 comparisons. Every activation is quantized
(the export's default), so float ops such as a Softmax run quantized on the HTP too.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_builders import masked_softmax_model
from onnx import TensorProto, helper, numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export
from lpbq_tvm.exports._onnx_graph import session
from lpbq_tvm.exports.qnn_htp import run_on_htp

pytestmark = pytest.mark.slow


def _one_layer(op_type: str):
    """x -> one LPBQ layer -> y: MatMul [512, 256], or Gemm (transB=1) with bias."""
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((512, 256)) / 22).astype(np.float32)
    if op_type == "Gemm":
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(weight.T), "w"),
            numpy_helper.from_array(rng.standard_normal(256).astype(np.float32) / 10, "b"),
        ]
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
        inits = [numpy_helper.from_array(weight, "w")]
    graph = helper.make_graph(
        [node],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("name", "bits", "tolerance"),
    [("example", 8, 2), ("masked", 8, 2), ("Gemm", 8, 2), ("MatMul", 16, 1), ("Gemm", 16, 2)],
)
def test_htp_runs_the_lpbq_fusion_and_matches_htp_sim(name, bits, tolerance, tmp_path):
    """ "masked": the Softmax of a masked input feeds the LPBQ MatMul (uint16: see the next test)."""
    models = {"example": (build_example_model, (1, 64, 8, 8)), "masked": (masked_softmax_model, (1, 8, 64))}
    build, shape = models.get(name, (lambda: _one_layer(name), (4, 512)))
    model = build()
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    sim = QuantizationSimModel(model)
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], data)
    path = tmp_path / "model.qnn.onnx"
    export(sim, path, "qnn-onnx", activation_bitwidth=bits, sample_inputs=data[0])

    run = run_on_htp(path, data[0])
    assert run.outputs is not None, run.reasons
    assert list(run.providers) == ["QNNExecutionProvider"]  # nothing fell back to the CPU
    lpbq_matmuls = {f"{node.name}/matmul" for node in sim.model.graph.node if node.op_type in ("MatMul", "Gemm")}
    assert len(lpbq_matmuls) == (2 if name == "example" else 1)
    assert run.lpbq_fusions == lpbq_matmuls  # every LPBQ MatMul fused by the QNN EP
    encoding = sim.layer_activation_encodings(bits)["fc2.weight" if name == "example" else "w"]["output"]
    simulated = lpbq_tvm.compile(sim, target="htp-sim", mode=f"w4a{bits}").run(data[0])["y"]
    difference = np.abs(encoding.quantize(run.outputs["y"]).astype(int) - encoding.quantize(simulated))
    assert difference.max() <= tolerance, f"{name} uint{bits}: HTP vs htp-sim {difference.max()} LSB"


def test_masked_softmax_at_uint16_is_within_the_htp_softmax_rounding(tmp_path):
    """The quantized Add and Softmax run on the HTP, not in fp16 (float probabilities put the output
    ~50 LSB away). The HTP's uint16 Softmax gives each probability within 1 LSB of onnxruntime's run
    of the same file, rounding low (a row's codes sum to a little under 65535); the output then
    differs from htp-sim by what those differences move the exact product, ``Δprobs · s_probs @ W /
    s_y``, plus at most 2 LSB: the HTP's LPBQ MatMul within 1 LSB, half an LSB of rounding each side."""
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(4)]
    sim = QuantizationSimModel(masked_softmax_model())
    set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], data)
    export(sim, tmp_path / "model.qnn.onnx", "qnn-onnx", activation_bitwidth=16, sample_inputs=data[0])
    probed = onnx.load(tmp_path / "model.qnn.onnx")  # the softmax output (a DQ output) as a second output
    probed.graph.output.extend([onnx.ValueInfoProto(name="probs")])
    onnx.save(probed, tmp_path / "probed.onnx")

    run = run_on_htp(tmp_path / "probed.onnx", data[0])
    assert run.outputs is not None, run.reasons
    assert list(run.providers) == ["QNNExecutionProvider"]
    assert run.lpbq_fusions == {"fc/matmul"}
    encodings = sim.tensor_activation_encodings(16)
    probs, y = encodings["probs"], encodings["y"]
    (cpu_probs,) = session(probed, optimize=False).run(["probs"], data[0])
    probs_lsb = probs.quantize(run.outputs["probs"]).astype(int) - probs.quantize(cpu_probs)
    assert np.abs(probs_lsb).max() <= 1
    moved = probs_lsb * probs.scale @ sim.encodings["w"].qdq_weight / y.scale
    simulated = lpbq_tvm.compile(sim, target="htp-sim", mode="w4a16").run(data[0])["y"]
    difference = y.quantize(run.outputs["y"]).astype(int) - y.quantize(simulated)
    unexplained = np.abs(difference - moved).max()
    assert unexplained <= 2, f"HTP vs htp-sim: {unexplained:.2f} LSB beyond what its Softmax rounding explains"
