"""Elementwise arithmetic, comparisons, logic, casts and activations against onnxruntime.

Bounds: one IEEE operation, a selection or a comparison is exact on both sides; a product and a
sum LLVM may contract into one FMA differ by one rounding (1 ulp); the fast polynomials of the
CPU pipeline are within 2 ulp (exp) or 4 ulp of 1.0 (tanh, erf) and onnxruntime's within about as
much, so transcendental functions get a few ulp plus, for the polynomials, that absolute term.
TVM evaluates the inverse trigonometric and hyperbolic functions by their log / sqrt formulas,
whose error near 0 is a few u absolute (the log of a value next to 1) rather than relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from harness import OpCase, check, exact, rng, ulps
from onnx import helper

U = 2.0**-24
ONE_ULP_OF_ONE = 2.0**-23


def _values(shape=(3, 17), low=-3.0, high=3.0, seed=0, dtype=np.float32):
    return rng(seed).uniform(low, high, shape).astype(dtype)


def _unary(op, bound=exact, low=-3.0, high=3.0, opset=18, dtype=np.float32, truth=None, **attrs):
    """``op`` on values in [low, high]; with ``truth`` (float64 numpy of x), bounded against it."""
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    name = op.lower() + "".join(f"_{k}{v}" for k, v in attrs.items())
    exact_values = (lambda inputs: {"y": truth(inputs["x"])}) if truth is not None else None
    return OpCase(
        name, [node], {"x": _values(low=low, high=high, dtype=dtype)}, bound=bound, opset=opset, truth=exact_values
    )


_erf = np.vectorize(math.erf)
_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def _softplus(x):
    """log(1 + e^x): rounding 1 + e^x costs u absolute, which the log passes on as is (hence 2 u)."""
    return np.log1p(np.exp(x))


def _affine_bound(run, alpha, beta, roundings=2):
    """``alpha x + beta`` (clipped): each rounding within u of the larger of the terms, on both sides."""
    return {"y": 2 * roundings * U * (alpha * np.abs(run.inputs["x"]).astype(np.float64) + beta)}


def _binary(op, bound=exact, a=None, b=None, opset=18, **attrs):
    a = _values() if a is None else a
    b = _values((17,), seed=1) if b is None else b  # broadcast along the last axis
    node = helper.make_node(op, ["a", "b"], ["y"], **attrs)
    return OpCase(
        f"{op.lower()}{'_' + str(b.dtype) if b.dtype != np.float32 else ''}",
        [node],
        {"a": a, "b": b},
        bound=bound,
        opset=opset,
    )


FAST_TANH_ERF = ulps(2, 4 * ONE_ULP_OF_ONE)
LOG_FORMULA = ulps(4, 4 * U)

UNARY = [
    _unary("Relu"),
    _unary("Neg"),
    _unary("Abs"),
    _unary("Floor"),
    _unary("Ceil"),
    _unary("Round"),  # half to even on both sides (inputs include x.5: see ROUND_HALVES)
    _unary("Sign"),
    _unary("Sqrt", low=0.0),
    _unary("Reciprocal"),
    _unary("LeakyRelu", alpha=0.1),
    _unary("ThresholdedRelu", alpha=0.5),
    _unary("Clip", opset=6, min=-1.0, max=0.5),
    _unary("Exp", ulps(2), truth=np.exp),
    _unary("Log", ulps(1), low=0.01, high=10.0, truth=np.log),
    _unary("Tanh", FAST_TANH_ERF, truth=np.tanh),
    _unary("Erf", FAST_TANH_ERF, truth=_erf),
    _unary("Sigmoid", ulps(2), truth=lambda x: 1 / (1 + np.exp(-x))),
    _unary("HardSigmoid", lambda run: _affine_bound(run, 0.3, 0.4), alpha=0.3, beta=0.4),
    _unary("HardSwish", lambda run: {"y": np.abs(run.inputs["x"]) * _affine_bound(run, 1 / 6, 0.5, 3)["y"]}),
    _unary("Softsign", ulps(2)),
    _unary("Softplus", ulps(2, 2 * U), truth=_softplus),
    _unary(
        "Elu", ulps(2, 2 * U), alpha=0.7, truth=lambda x: np.where(x > 0, x, 0.7 * np.expm1(x))
    ),  # exp(x) - 1 near 0: the exp's error, absolute
    _unary("Selu", ulps(2, 4 * U), truth=lambda x: _SELU_GAMMA * np.where(x > 0, x, _SELU_ALPHA * np.expm1(x))),
    _unary("Mish", ulps(2, 4 * U), truth=lambda x: x * np.tanh(_softplus(x))),
    _unary(
        "Gelu", ulps(2, 4 * ONE_ULP_OF_ONE * 3 / 2), opset=20, truth=lambda x: x / 2 * (1 + _erf(x / np.sqrt(2)))
    ),  # x/2 (1 + erf): the erf's absolute error times |x|/2
    _unary(
        "Gelu",
        ulps(2, 4 * ONE_ULP_OF_ONE * 3 / 2),
        opset=20,
        approximate="tanh",
        truth=lambda x: x / 2 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    ),
    _unary("Sin", ulps(1), truth=np.sin),
    _unary("Cos", ulps(1), truth=np.cos),
    _unary("Tan", ulps(3), low=-1.2, high=1.2, truth=np.tan),  # sin / cos
    _unary("Sinh", ulps(2), truth=np.sinh),
    _unary("Cosh", ulps(2), truth=np.cosh),
    _unary("Atan", LOG_FORMULA, truth=np.arctan),
    _unary("Asin", LOG_FORMULA, low=-0.99, high=0.99, truth=np.arcsin),
    _unary("Acos", LOG_FORMULA, low=-0.99, high=0.99, truth=np.arccos),
    _unary("Asinh", LOG_FORMULA, truth=np.arcsinh),
    _unary("Acosh", LOG_FORMULA, low=1.0, high=5.0, truth=np.arccosh),
    _unary("Atanh", LOG_FORMULA, low=-0.99, high=0.99, truth=np.arctanh),
    _unary("IsNaN"),
    _unary("IsInf"),
    _unary("Not", dtype=np.bool_),
    _unary("Cast", to=7),  # to int64: truncation toward zero
    _unary("Cast", to=10),  # to float16: round to nearest even
    _unary("Cast", to=9),  # to bool
]

ROUND_HALVES = OpCase(
    "round_halves", [helper.make_node("Round", ["x"], ["y"])], {"x": np.arange(-4.5, 5.0, 0.5, dtype=np.float32)}
)
SPECIAL_VALUES = OpCase(
    "isinf_isnan_of_special_values",
    [helper.make_node("IsInf", ["x"], ["inf"]), helper.make_node("IsNaN", ["x"], ["y"])],
    {"x": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38], np.float32)},
    outputs=("inf", "y"),
)
# (Relu of NaN differs: TVM's max(x, 0) is LLVM's maxnum, which returns 0; onnxruntime gives NaN.)
RELU_OF_SPECIAL_VALUES = OpCase(
    "relu_of_special_values",
    [helper.make_node("Relu", ["x"], ["y"])],
    {"x": np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, -3.4e38], np.float32)},
)

BINARY = [
    _binary("Add"),
    _binary("Sub"),
    _binary("Mul"),
    _binary("Div", b=_values((17,), 0.5, 2.0, seed=1)),
    _binary("Pow", ulps(2), a=_values(low=0.1, high=3.0), b=_values((17,), -2.0, 2.0, seed=1)),
    _binary("Max"),
    _binary("Min"),
    _binary("PRelu", b=_values((17,), 0.0, 0.5, seed=1)),
    _binary("Mod", a=_values(low=-10, high=10), b=_values((17,), 1.0, 3.0, seed=1), fmod=1),
    _binary("Mod", a=rng(2).integers(-20, 20, (3, 17)), b=rng(3).integers(1, 7, (17,))),
    _binary("Equal", a=rng(2).integers(0, 3, (3, 17)), b=rng(3).integers(0, 3, (17,))),
    _binary("Greater"),
    _binary("Less"),
    _binary("GreaterOrEqual"),
    _binary("LessOrEqual"),
    _binary("And", a=rng(2).integers(0, 2, (3, 17)).astype(bool), b=rng(3).integers(0, 2, (17,)).astype(bool)),
    _binary("Or", a=rng(2).integers(0, 2, (3, 17)).astype(bool), b=rng(3).integers(0, 2, (17,)).astype(bool)),
    _binary("Xor", a=rng(2).integers(0, 2, (3, 17)).astype(bool), b=rng(3).integers(0, 2, (17,)).astype(bool)),
    _binary(
        "BitShift",
        a=rng(2).integers(0, 255, (3, 17)).astype(np.uint8),
        b=rng(3).integers(0, 4, (17,)).astype(np.uint8),
        direction="LEFT",
    ),
]

DIVISION_BY_A_CONSTANT = OpCase(
    "div_by_constant",  # ReciprocalDivision: x * RN(1/c), within 3 u of x / c (2 ulp)
    [helper.make_node("Div", ["x", "c"], ["y"])],
    {"x": _values()},
    constants={"c": _values((17,), 0.5, 2.0, seed=1)},
    bound=ulps(2),
)
WHERE = OpCase(
    "where",
    [helper.make_node("Where", ["condition", "a", "b"], ["y"])],
    {"condition": rng(1).integers(0, 2, (3, 17)).astype(bool), "a": _values(), "b": _values((17,), seed=2)},
)
VARIADIC = OpCase(
    "sum_mean_max_of_three",
    [
        helper.make_node("Sum", ["a", "b", "c"], ["sum"]),
        helper.make_node("Mean", ["a", "b", "c"], ["mean"]),
        helper.make_node("Max", ["a", "b", "c"], ["max"]),
    ],
    {"a": _values(), "b": _values((17,), seed=1), "c": _values((3, 1), seed=2)},
    outputs=("sum", "mean", "max"),
    bound=lambda run: _variadic_bound(run),
)


def _variadic_bound(run):
    """Two additions per element each side (and the division by 3 for the mean): 2 u per rounding
    relative to the sum of the magnitudes."""
    magnitude = sum(np.abs(run.inputs[name]).astype(np.float64) for name in ("a", "b", "c"))
    return {"sum": 2 * 2 * U * magnitude, "mean": 2 * 3 * U * magnitude / 3, "max": 0.0}


@pytest.mark.parametrize(
    "case",
    UNARY + [ROUND_HALVES, SPECIAL_VALUES, RELU_OF_SPECIAL_VALUES] + BINARY + [DIVISION_BY_A_CONSTANT, WHERE, VARIADIC],
    ids=str,
)
def test_elementwise(case):
    check(case)
