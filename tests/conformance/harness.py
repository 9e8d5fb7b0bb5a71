"""The op-conformance harness: one small ONNX model per case, through the product's own compile path,
compared with onnxruntime at an error bound derived from what the op computes.

A case is a node (or a few), its runtime inputs and constant initializers, and an :data:`ErrorBound`:
a function of the run (inputs, constants, onnxruntime's outputs, the model) giving, per output,
the largest difference allowed between the compiled result and onnxruntime's. The bounds:

* :func:`exact` — data movement, comparisons, integer arithmetic, one IEEE operation (``Add``,
  ``Sqrt``, ...) and selections (``Max``, ``MaxPool``): the same operations on the same values;
* :func:`ulps` — an elementwise function evaluated by two libraries: each within a few ulp of the
  exact value, so their difference within the sum, plus an absolute term where a fast polynomial
  is accurate to an absolute error (``tanh``, ``erf``: 4 ulp of 1.0);
* :func:`dot` — sums of ``terms`` products (Conv, MatMul, pooling, reductions): two orders of
  summation differ by at most ``2 (terms + 4) u`` times the sum of the magnitudes of the terms,
  which onnxruntime computes itself on the *absolute* model (every float input and constant
  replaced by its absolute value; these ops are linear in each argument).

``check`` imports the model with ``QuantizationSimModel``, compiles it with ``lpbq_tvm.compile``
(fp32; with ``lpbq=True`` also LPBQ weight-only, which must reproduce the simulation to cos >=
0.9999) and asserts every output within its bound. Where TVM's importer itself fails, the case
says so (``importer_error``) and asserts that the product refuses the model at once, naming the
op and TVM's error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from model_builders import UNIT_ROUNDOFF, absolute_model, ort_run
from onnx import helper, numpy_helper

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.frontend import ModelImportError

__all__ = ["OpCase", "Run", "check", "dot", "exact", "rng", "ulps"]


@dataclass(frozen=True)
class Run:
    """What a bound may look at: the case's values, onnxruntime's outputs and the model."""

    inputs: Mapping[str, np.ndarray]
    constants: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    model: onnx.ModelProto


ErrorBound = Callable[[Run], Mapping[str, np.ndarray | float]]


@dataclass(frozen=True)
class OpCase:
    """``nodes`` reading ``inputs`` (fed at run time) and ``constants`` (initializers), writing ``outputs``."""

    id: str
    nodes: Sequence[onnx.NodeProto]
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] = ("y",)
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    bound: ErrorBound | None = None  # None: exact
    # float64 values of the outputs: the bound is then against these, and onnxruntime is only asked
    # to agree with them to 1e-4 relative, 1e-6 of the largest value (the same function: its
    # result near zero may lose more, as in a log-softmax), as its fast approximations of
    # exp / tanh / logistic are further from exact than the compiled code
    truth: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None
    opset: int = 18
    lpbq: bool = False  # a weight qualifies: compile LPBQ weight-only too
    # TVM 0.27's importer fails on this case: the product must refuse it up front, naming the op
    # and TVM's error (this text); the case fails once TVM imports it, to be made a real case then
    importer_error: str = ""
    block_size: int = 32

    def __str__(self) -> str:
        return self.id


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def exact(run: Run) -> dict[str, float]:
    return dict.fromkeys(run.expected, 0.0)


def ulps(n: float, absolute: float = 0.0) -> ErrorBound:
    """``n`` ulp of onnxruntime's value plus ``absolute``."""

    def bound(run: Run) -> dict[str, np.ndarray]:
        return {
            name: n * np.spacing(np.abs(value).astype(np.float32)).astype(np.float64) + absolute
            for name, value in run.expected.items()
        }

    return bound


def dot(terms: int, extra_roundings: int = 0) -> ErrorBound:
    """Sums of ``terms`` products (and ``extra_roundings`` more operations on each sum): ``2 (terms
    + 4 + extra_roundings) u`` times the absolute model's output."""

    def bound(run: Run) -> dict[str, np.ndarray]:
        magnitude = ort_run(absolute_model(run.model), {name: np.abs(value) for name, value in run.inputs.items()})
        return {
            name: 2 * (terms + 4 + extra_roundings) * UNIT_ROUNDOFF * np.abs(magnitude[name]).astype(np.float64)
            for name in run.expected
        }

    return bound


def build(case: OpCase) -> onnx.ModelProto:
    """The case as a model; its outputs typed and shaped as onnxruntime computes them."""
    value_infos = [
        helper.make_tensor_value_info(name, _onnx_type(value), value.shape) for name, value in case.inputs.items()
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in case.constants.items()]

    def model_with(outputs):
        graph = helper.make_graph(list(case.nodes), case.id, value_infos, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
        model.ir_version = 8
        return model

    untyped = model_with([onnx.ValueInfoProto(name=name) for name in case.outputs])
    results = ort_run(untyped, dict(case.inputs))
    return model_with([_value_info(name, results[name]) for name in case.outputs])


def _value_info(name: str, value: np.ndarray | list[np.ndarray]) -> onnx.ValueInfoProto:
    if isinstance(value, list):  # a sequence: its elements' type, their shapes where they agree
        shapes = {item.shape for item in value}
        shape = next(iter(shapes)) if len(shapes) == 1 else None
        return helper.make_tensor_sequence_value_info(name, _onnx_type(value[0]), shape)
    return helper.make_tensor_value_info(name, _onnx_type(value), value.shape)


def _onnx_type(value: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(value.dtype)


def check(case: OpCase) -> None:
    model = build(case)
    expected = ort_run(model, dict(case.inputs))
    if case.importer_error:
        op = case.nodes[0].op_type
        with pytest.raises(ModelImportError, match=rf"^TVM's ONNX importer failed on {op} \(nodes: .*\): "):
            QuantizationSimModel(model)
        with pytest.raises(ModelImportError, match=re.escape(case.importer_error)):
            QuantizationSimModel(model)
        return
    sim = QuantizationSimModel(model)
    actual = lpbq_tvm.compile(sim, "cpu", "fp32").run(dict(case.inputs))
    for name in case.outputs:
        if isinstance(expected[name], list):  # a sequence: its elements, exactly
            assert len(actual[name]) == len(expected[name]), name
            for index, (item, reference) in enumerate(zip(actual[name], expected[name], strict=True)):
                assert item.dtype == reference.dtype and item.shape == reference.shape, (name, index)
                np.testing.assert_array_equal(item, reference, err_msg=f"{name}[{index}]")
            continue
        assert actual[name].dtype == expected[name].dtype and actual[name].shape == expected[name].shape, (
            f"{name}: {actual[name].dtype}{list(actual[name].shape)}, "
            f"onnxruntime {expected[name].dtype}{list(expected[name].shape)}"
        )
    if case.truth is not None:
        truth = case.truth({name: value.astype(np.float64) for name, value in case.inputs.items()})
        for name in case.outputs:
            scale = np.abs(truth[name])
            _assert_within(f"{name} (onnxruntime)", expected[name], truth[name], 1e-4 * scale + 1e-6 * scale.max())
        expected = truth
    bounds = (case.bound or exact)(Run(case.inputs, case.constants, expected, model))
    for name in case.outputs:
        if not isinstance(expected[name], list):
            _assert_within(name, actual[name], expected[name], bounds[name])
    if case.lpbq:
        set_grouped_blockwise_quantization_for_weights(sim, block_size=case.block_size)
        sim.compute_encodings(lambda s, batch: s.run(batch), dict(case.inputs))
        assert any(row.status == "lpbq" for row in sim.report()), [row.reason for row in sim.report()]
        simulated = sim.run(dict(case.inputs))
        compiled = lpbq_tvm.compile(sim, "cpu", "weight-only").run(dict(case.inputs))
        for name in case.outputs:
            a, b = compiled[name].ravel().astype(np.float64), simulated[name].ravel().astype(np.float64)
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999, name


def _assert_within(name: str, actual: np.ndarray, reference: np.ndarray, bound) -> None:
    """``|actual - reference| <= bound`` (NaN where the reference is NaN); integers and booleans equal."""
    if not np.issubdtype(reference.dtype, np.floating):
        np.testing.assert_array_equal(actual, reference, err_msg=name)
        return
    a, r = actual.astype(np.float64), reference.astype(np.float64)
    nan = np.isnan(r)
    assert (np.isnan(a) == nan).all(), f"{name}: NaN at {np.argwhere(np.isnan(a) != nan)[:3].tolist()}, not both"
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        error = np.where(nan | (a == r), 0.0, np.abs(a - r))
    allowed = np.broadcast_to(bound, r.shape)
    worst = np.unravel_index(np.argmax(error - allowed), r.shape) if r.size else ()
    assert (error <= allowed).all(), f"{name}: |{a[worst]!r} - {r[worst]!r}| > {allowed[worst]:.3g} at {worst}"
