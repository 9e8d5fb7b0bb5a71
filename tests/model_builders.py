"""Tiny ONNX models with one LPBQ candidate layer each, and the float error bound to check them with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from ir import prim_funcs
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, tirx

from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.targets import get_target

UNIT_ROUNDOFF = 2.0**-24  # float32
# The classic CNN graphs the onnx wheel ships (weights as ConstantOfShape fills), e.g. light_resnet50.onnx.
LIGHT_CNN_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@dataclass(frozen=True, eq=False)  # hashed by identity: cases are module-level constants
class LayerCase:
    """One layer: ``y = op(x, w) (+ b)``; ``terms`` is the length of each output's dot product."""

    name: str
    op_type: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    bias: bool = False
    attrs: dict = field(default_factory=dict)

    @property
    def terms(self) -> int:
        if self.op_type == "Conv":
            return int(np.prod(self.w_shape[1:]))
        return self.w_shape[1] if self.attrs.get("transB") else self.w_shape[0]

    @property
    def channels(self) -> int:
        if self.op_type == "Gemm" and not self.attrs.get("transB"):
            return self.w_shape[1]
        return self.w_shape[0] if self.op_type in ("Gemm", "Conv") else self.w_shape[-1]


LAYER_CASES = [
    LayerCase("gemm_transb1_bias", "Gemm", (3, 128), (32, 128), bias=True, attrs={"transB": 1}),
    LayerCase("gemm_transb1", "Gemm", (3, 128), (32, 128), attrs={"transB": 1}),
    LayerCase("gemm_transb0_bias", "Gemm", (3, 128), (128, 32), bias=True, attrs={"transB": 0}),
    LayerCase("gemm_transb0", "Gemm", (3, 128), (128, 32)),
    LayerCase("matmul_2d", "MatMul", (3, 128), (128, 48)),
    LayerCase("matmul_3d", "MatMul", (2, 5, 192), (192, 16)),
    LayerCase(
        "conv1d_stride_pad_bias",
        "Conv",
        (1, 64, 20),
        (16, 64, 3),
        bias=True,
        attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 1]},
    ),
    LayerCase(
        "conv2d_stride_pad_dilation_bias",
        "Conv",
        (2, 64, 9, 9),
        (16, 64, 3, 3),
        bias=True,
        attrs={"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 2, 1, 0], "dilations": [2, 1]},
    ),
    LayerCase(
        "conv2d_grouped",
        "Conv",
        (1, 128, 6, 6),
        (32, 64, 3, 3),
        bias=True,
        attrs={"kernel_shape": [3, 3], "group": 2, "pads": [1, 1, 1, 1]},
    ),
]

DEPTHWISE_CASE = LayerCase(
    "conv2d_depthwise",
    "Conv",
    (1, 16, 8, 8),
    (16, 1, 3, 3),
    bias=True,
    attrs={"kernel_shape": [3, 3], "group": 16, "pads": [1, 1, 1, 1]},
)


def layer_model(
    case: LayerCase,
    seed: int = 0,
    weight: np.ndarray | None = None,
    bias_value: float | None = None,
) -> onnx.ModelProto:
    """``x -> op(x, w[, b]) -> y`` with seeded Gaussian weights (or the given ``weight``)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(case.w_shape).astype(np.float32) if weight is None else weight
    initializers = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if case.bias:
        b = (
            rng.standard_normal(case.channels).astype(np.float32)
            if bias_value is None
            else np.full(case.channels, bias_value, np.float32)
        )
        initializers.append(numpy_helper.from_array(b, "b"))
        inputs.append("b")
    node = helper.make_node(case.op_type, inputs, ["y"], name=case.name, **case.attrs)
    graph = helper.make_graph(
        [node],
        case.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(case.x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def ort_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def with_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` replaced by ``value``."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for init in result.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return result
    raise KeyError(name)


def computed_in_graph(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` reaches its consumers through an ``Identity`` node,
    as a weight passes through AIMET's quantizer node: onnxruntime's kernels then see a computed
    operand, not a constant they may pre-pack (pre-packed and plain MatMul differ in the last bit)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    stored = f"{name}/stored"
    next(init for init in result.graph.initializer if init.name == name).name = stored
    result.graph.node.insert(0, onnx.helper.make_node("Identity", [stored], [name], name=f"{name}/identity"))
    return result


def dot_product_bound(case: LayerCase, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-output bound on the float32 error of a kernel against a reference of the same math.

    Both sides compute ``y = Σ x_i w_i`` over ``terms`` products in float32 in different orders,
    the kernel with ``w = float(q·k)`` scaled by ``s`` after the sum, the reference with
    ``w = float32(float32(k·s)·q)``: each differs from the exact sum by at most
    ``(terms + 3) · u · Σ|x_i||w_i|`` (Higham's γ_n for the sum, plus the scale roundings),
    so their difference is at most twice that, plus one rounding of the bias add.
    """
    magnitude = ort_run(with_weight(layer_model(case, bias_value=0.0), "w", np.abs(weight)), {"x": np.abs(x)})["y"]
    return 2 * (case.terms + 4) * UNIT_ROUNDOFF * magnitude


def assert_float_close(actual: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> None:
    """``|actual - reference| <= bound + u·|reference|`` everywhere (u for a final rounding)."""
    error = np.abs(actual.astype(np.float64) - reference)
    allowed = bound + UNIT_ROUNDOFF * np.abs(reference)
    worst = np.unravel_index(np.argmax(error - allowed), error.shape)
    assert (error <= allowed).all(), f"error {error[worst]:.3g} > bound {allowed[worst]:.3g} at {worst}"


def absolute_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float initializer replaced by its absolute value: run on absolute
    inputs, a linear model computes the sum of the magnitudes of the terms of each output."""
    absolute = onnx.ModelProto()
    absolute.CopyFrom(model)
    for init in absolute.graph.initializer:
        value = numpy_helper.to_array(init)
        if np.issubdtype(value.dtype, np.floating):
            init.CopyFrom(numpy_helper.from_array(np.abs(value), init.name))
    return absolute


def abs_network_bound(model: onnx.ModelProto, inputs: dict[str, np.ndarray], terms: Sequence[int]) -> np.ndarray:
    """Float32 error bound for two evaluations of a network of linear layers with ReLU / pooling.

    Each layer of ``terms[l]``-long dot products adds at most ``2 (terms[l] + 4) u`` times the
    magnitude the same layer reaches in the *absolute network* (every float initializer and input
    replaced by its absolute value); monotone 1-Lipschitz activations and averaging carry errors
    and magnitudes forward alike, so the output error is bounded by that sum times the absolute
    network's output.
    """
    (magnitude,) = ort_run(absolute_model(model), {name: np.abs(v) for name, v in inputs.items()}).values()
    return 2 * sum(t + 4 for t in terms) * UNIT_ROUNDOFF * magnitude


def constant_weight_module(value: np.ndarray):
    """A Relax module ``main(x) = matmul(x, const(value))``: a MatMul whose weight is a constant."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    rows, cols = value.shape

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, rows), "float32")) -> R.Tensor((2, cols), "float32"):
            return R.matmul(x, relax.const(value))

    return Module


def masked_softmax_model(rows: int = 8, width: int = 64) -> onnx.ModelProto:
    """``y = Softmax(x + mask) @ w``: a causal mask holding -3.4e38 (float32's lowest, as exporters
    write attention masks) as a Constant node, then one LPBQ candidate MatMul ``w`` [width, width]."""
    mask = np.where(np.arange(width)[None, :] > np.arange(rows)[:, None] * (width // rows), -3.4e38, 0.0)
    weight = np.random.default_rng(5).standard_normal((width, width)) / np.sqrt(width)
    nodes = [
        helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask.astype(np.float32), "mask")),
        helper.make_node("Add", ["x", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


EXAMPLE_TERMS = (64 * 9, 128, 256)  # dot-product lengths of the example model's conv, fc1, fc2


def dequantized_weights_model(sim) -> onnx.ModelProto:
    """``sim``'s prepared model with its LPBQ-dequantized weights: what ``sim.run`` evaluates."""
    model = sim.model
    for name, encoding in sim.encodings.items():
        model = with_weight(model, name, encoding.qdq_weight)
    return model


def simulation_bound(sim, inputs: dict[str, np.ndarray], terms: Sequence[int] = EXAMPLE_TERMS) -> np.ndarray:
    """:func:`abs_network_bound` of ``sim``'s model with its LPBQ-dequantized weights: how far a
    compiled weight-only model may lie from ``sim.run`` by summation order alone."""
    return abs_network_bound(dequantized_weights_model(sim), inputs, terms)


def gated_softmax_model(rows: int = 8, width: int = 64) -> onnx.ModelProto:
    """Float ops between two LPBQ candidate MatMuls, next to a bool and an int64 tensor::

    h = x @ w1;  positive = h > 0 (bool);  gated = Where(positive, h, x);  probs = Softmax(gated)
    y = probs @ w2;  label = ArgMax(y) (int64, a second output)
    """
    rng = np.random.default_rng(7)
    weights = {name: rng.standard_normal((width, width)) / np.sqrt(width) for name in ("w1", "w2")}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32), "zero")),
        helper.make_node("Greater", ["h", "zero"], ["positive"], name="gate"),
        helper.make_node("Where", ["positive", "h", "x"], ["gated"], name="select"),
        helper.make_node("Softmax", ["gated"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "w2"], ["y"], name="fc2"),
        helper.make_node("ArgMax", ["y"], ["label"], name="argmax", axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "gated_softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, width])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [1, rows]),
        ],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor_values(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` over all ``batches`` (concatenated along a new first axis),
    from onnxruntime with no graph optimization."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    runs = [ort_run(probed, batch) for batch in batches]
    return {name: np.stack([run[name] for run in runs]) for name in names}


def minmax_encodings(sim, batches: Sequence[dict[str, np.ndarray]], names: Sequence[str], bitwidth: int) -> dict:
    """The encodings min/max calibration should give the tensors ``names`` of ``sim`` on ``batches``,
    from their values in onnxruntime (independent of the observers)."""
    from lpbq_tvm.calibration import activation_encoding

    values = tensor_values(dequantized_weights_model(sim), batches, names)
    return {name: activation_encoding(float(v.min()), float(v.max()), bitwidth) for name, v in values.items()}


def epilogue_model(op: str, x_shape, w_shape, attrs=None):
    """``y = hardswish(op(x, w) + 0.5)``: the op, then an elementwise epilogue of its own function."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(op, ["x", "w"], ["z"], name="layer", **(attrs or {})),
        helper.make_node("Add", ["z", "half"], ["a"]),
        helper.make_node("HardSwish", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])],
        [
            numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
            numpy_helper.from_array(np.float32(0.5), "half"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def unary_model(ops: list[str], shape) -> onnx.ModelProto:
    nodes = [helper.make_node(op, ["x"], [f"y_{op.lower()}"], name=op) for op in ops]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(f"y_{op.lower()}", TensorProto.FLOAT, list(shape)) for op in ops],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def nhwc_conv(x_shape, w_shape, groups, padding, stride=1) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        conv = relax.op.nn.conv2d(x, w, stride, [padding] * 4, groups=groups, data_layout="NHWC", kernel_layout="HWIO")
        bb.emit_func_output(bb.emit(conv))
    return bb.get()


def cpu_scheduled(model: onnx.ModelProto | tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The kernels the cpu target's pipeline compiles for ``model`` (ONNX, imported first, or Relax), by name."""
    mod = import_onnx(model).mod if isinstance(model, onnx.ModelProto) else model
    return prim_funcs(get_target("cpu").pipeline()(mod))


def reordering_bound(sim, reference: np.ndarray) -> float:
    """Two float32 evaluations of one network differ by the order of their sums: each dot product of
    length K by at most 2 (K + 4) u of its magnitude (Higham, both sides), to first order and
    without amplification between layers, summed over the layers, relative to the largest output."""
    lengths = [int(np.prod(row.shape)) // row.shape[0] for row in sim.report()]
    return 2 * sum(k + 4 for k in lengths) * UNIT_ROUNDOFF * float(np.abs(reference).max())
