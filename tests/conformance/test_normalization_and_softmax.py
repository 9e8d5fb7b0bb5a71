"""BatchNormalization, LayerNormalization, InstanceNormalization, GroupNormalization, Softmax and
LogSoftmax against float64 values of their ONNX definitions (onnxruntime agreeing).

Bounds, for a normalization over ``n`` values: the mean and the variance are sums of ``n`` terms,
each within ``(n + 2) u`` relative; ``(x - mean) / sqrt(var + eps)`` then carries the mean's
error (relative to ``|mean| / std``) and the variance's half (the square root) into every output,
plus a few roundings of the affine ``* gamma + beta``. Softmax: TVM's fast exp (2 ulp), a sum of
``n`` positive terms (``n u``) and the division.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import OpCase, check, rng
from onnx import helper

U = 2.0**-24


def _normal(*shape, seed=0, scale=1.0, shift=0.0):
    return (rng(seed).standard_normal(shape) * scale + shift).astype(np.float32)


def _normalized(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps), mean


def _normalization_bound(x, axes, gamma=1.0, beta=0.0):
    """See the module docstring: (n + 2) u of the mean over the standard deviation, (n + 2) u / 2 of
    the variance, for each side, times |y| or |gamma|, plus 4 roundings of the result."""
    n = int(np.prod([x.shape[a] for a in axes]))
    normalized, mean = _normalized(x, axes, 0.0)
    std = x.std(axis=axes, keepdims=True)
    relative = (n + 2) * U * (np.abs(mean) + np.abs(x).mean(axis=axes, keepdims=True)) / std
    error = 2 * (relative + (n + 2) * U / 2 * np.abs(normalized)) * np.abs(gamma)
    return error + 4 * U * (np.abs(normalized * gamma) + np.abs(beta))


def _layer_norm():
    x, gamma, beta = _normal(2, 5, 64, shift=3.0), _normal(64, seed=1), _normal(64, seed=2)
    return OpCase(
        "layernormalization",
        [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)],
        {"x": x},
        constants={"gamma": gamma, "beta": beta},
        truth=lambda i: {"y": _normalized(i["x"], (2,), 1e-5)[0] * gamma + beta},
        bound=lambda run: {"y": _normalization_bound(x.astype(np.float64), (2,), gamma, beta)},
    )


def _layer_norm_two_axes():
    x = _normal(2, 6, 8, seed=3)
    return OpCase(
        "layernormalization_axis1_no_bias",
        [helper.make_node("LayerNormalization", ["x", "gamma"], ["y"], axis=1)],
        {"x": x},
        constants={"gamma": np.ones((6, 8), np.float32)},
        truth=lambda i: {"y": _normalized(i["x"], (1, 2), 1e-5)[0]},
        bound=lambda run: {"y": _normalization_bound(x.astype(np.float64), (1, 2))},
    )


def _instance_norm():
    x, gamma, beta = _normal(2, 4, 5, 6, seed=4), _normal(4, seed=5), _normal(4, seed=6)
    g, b = gamma[:, None, None], beta[:, None, None]
    return OpCase(
        "instancenormalization",
        [helper.make_node("InstanceNormalization", ["x", "gamma", "beta"], ["y"], epsilon=1e-5)],
        {"x": x},
        constants={"gamma": gamma, "beta": beta},
        truth=lambda i: {"y": _normalized(i["x"], (2, 3), 1e-5)[0] * g + b},
        bound=lambda run: {"y": _normalization_bound(x.astype(np.float64), (2, 3), g, b)},
    )


def _group_norm():
    x, gamma, beta = _normal(2, 8, 4, 4, seed=7), _normal(8, seed=8), _normal(8, seed=9)
    grouped = x.astype(np.float64).reshape(2, 2, 4, 4, 4)
    g, b = gamma[:, None, None], beta[:, None, None]
    return OpCase(
        "groupnormalization",
        [helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["y"], num_groups=2, epsilon=1e-5)],
        {"x": x},
        constants={"gamma": gamma, "beta": beta},
        opset=21,
        truth=lambda i: {"y": _normalized(i["x"].reshape(2, 2, 4, 4, 4), (2, 3, 4), 1e-5)[0].reshape(x.shape) * g + b},
        bound=lambda run: {
            "y": _normalization_bound(grouped, (2, 3, 4), 1.0, 0.0).reshape(x.shape) * np.abs(g) + 4 * U * np.abs(b)
        },
    )


def _batch_norm():
    x = _normal(2, 6, 5, 5, seed=10)
    scale, bias, mean, var = _normal(6, seed=11), _normal(6, seed=12), _normal(6, seed=13), rng(14).uniform(0.5, 2, 6)
    shape = (6, 1, 1)
    a = scale / np.sqrt(var + 1e-5)
    return OpCase(
        "batchnormalization_inference",
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-5)],
        {"x": x},
        constants={"scale": scale, "bias": bias, "mean": mean, "var": var.astype(np.float32)},
        truth=lambda i: {"y": (i["x"] - mean.reshape(shape)) * a.reshape(shape) + bias.reshape(shape)},
        # AffineBatchNorm: x * a + b with a, b rounded once from float64: a few u of |x a| + |b| + |mean a|
        bound=lambda run: {
            "y": 4 * U * (np.abs(x * a.reshape(shape)) + np.abs(bias).reshape(shape) + np.abs(mean * a).reshape(shape))
        },
    )


def _softmax(op, axis, shape=(2, 3, 40)):
    x = _normal(*shape, seed=16, scale=3.0)

    def truth(i):
        shifted = i["x"] - i["x"].max(axis=axis, keepdims=True)
        logs = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return {"y": np.exp(logs) if op == "Softmax" else logs}

    n = shape[axis]
    if op == "Softmax":  # exp within 2 ulp, a sum of n positive terms, the division
        bound = lambda run: {"y": (2 + n + 2) * 2 * U * np.abs(run.expected["y"])}  # noqa: E731
    else:  # x - max - log(sum): the log of the sum within (n + 4) u, absolute
        bound = lambda run: {"y": 4 * U * np.abs(run.expected["y"]) + (n + 6) * U + 4 * U * np.abs(x).max()}  # noqa: E731
    return OpCase(
        f"{op.lower()}_axis{axis}", [helper.make_node(op, ["x"], ["y"], axis=axis)], {"x": x}, truth=truth, bound=bound
    )


CASES = [
    _layer_norm(),
    _layer_norm_two_axes(),
    _instance_norm(),
    _group_norm(),
    _batch_norm(),
    _softmax("Softmax", -1),
    _softmax("Softmax", 1),
    _softmax("LogSoftmax", -1),
    _softmax("LogSoftmax", 0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_normalization_and_softmax(case):
    check(case)
