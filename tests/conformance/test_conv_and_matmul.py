"""Conv, ConvTranspose, Gemm, MatMul and Einsum against onnxruntime: sums of products, within the
reordering bound of their dot-product length; where a weight qualifies, LPBQ weight-only too."""

from __future__ import annotations

import numpy as np
import pytest
from harness import OpCase, check, dot, rng
from onnx import helper


def _normal(*shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


def _conv(id, x_shape, w_shape, *, transpose=False, bias=True, lpbq=False, **attrs):
    op = "ConvTranspose" if transpose else "Conv"
    groups = attrs.get("group", 1)
    terms = int(np.prod(w_shape[1:])) if not transpose else w_shape[0] // groups * int(np.prod(w_shape[2:]))
    constants = {"w": (_normal(*w_shape, seed=1) / np.sqrt(terms)).astype(np.float32)}
    if bias:
        constants["b"] = _normal(w_shape[1] * groups if transpose else w_shape[0], seed=2)
    node = helper.make_node(op, ["x", "w", *(["b"] if bias else [])], ["y"], **attrs)
    return OpCase(id, [node], {"x": _normal(*x_shape)}, constants=constants, bound=dot(terms), lpbq=lpbq)


CONVOLUTIONS = [
    _conv("conv1d", (1, 8, 20), (16, 8, 3)),
    _conv("conv1d_stride2_pad_dilation2", (2, 8, 23), (16, 8, 3), strides=[2], pads=[2, 1], dilations=[2]),
    _conv("conv1d_groups", (1, 8, 16), (8, 2, 5), group=4, pads=[2, 2]),
    _conv("conv2d_same_upper", (1, 4, 9, 9), (8, 4, 3, 3), auto_pad="SAME_UPPER", bias=False),
    _conv("conv2d_stride2_asymmetric_pads", (1, 6, 11, 10), (12, 6, 3, 3), strides=[2, 2], pads=[0, 1, 2, 1]),
    _conv("conv2d_dilation2", (1, 4, 12, 12), (8, 4, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    _conv("conv2d_depthwise", (1, 16, 8, 8), (16, 1, 3, 3), group=16, pads=[1, 1, 1, 1]),
    _conv("conv2d_groups4", (1, 16, 8, 8), (32, 4, 3, 3), group=4, pads=[1, 1, 1, 1]),
    _conv("conv2d_1x1_batch3", (3, 64, 7, 7), (32, 64, 1, 1), lpbq=True),
    _conv("conv2d_3x3_lpbq", (1, 64, 10, 10), (32, 64, 3, 3), pads=[1, 1, 1, 1], lpbq=True),
    _conv("conv2d_rectangular_kernel", (1, 4, 10, 9), (6, 4, 1, 5), pads=[0, 2, 0, 2]),
    _conv("conv3d", (1, 3, 6, 6, 6), (4, 3, 3, 3, 3), pads=[1, 1, 1, 1, 1, 1]),
    _conv("convtranspose1d", (1, 8, 10), (8, 4, 3), transpose=True),
    _conv(
        "convtranspose1d_stride2_output_padding", (1, 8, 10), (8, 4, 3), transpose=True, strides=[2], output_padding=[1]
    ),
    _conv("convtranspose2d", (1, 8, 6, 6), (8, 4, 3, 3), transpose=True, pads=[1, 1, 1, 1]),
    _conv("convtranspose2d_stride2_upsample", (1, 16, 5, 5), (16, 8, 2, 2), transpose=True, strides=[2, 2]),
    _conv(
        "convtranspose2d_stride2_pads_output_padding",
        (1, 8, 5, 6),
        (8, 4, 3, 3),
        transpose=True,
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    ),
    _conv("convtranspose2d_groups", (1, 8, 5, 5), (8, 2, 3, 3), transpose=True, group=4, strides=[2, 2]),
    _conv("convtranspose2d_dilation2", (1, 4, 5, 5), (4, 4, 3, 3), transpose=True, dilations=[2, 2], bias=False),
]


def _dense(id, op, x_shape, w_shape, *, lpbq=False, bias_shape=None, **attrs):
    transposed = attrs.get("transB", 0)
    terms = w_shape[1] if transposed else w_shape[0]
    inputs = ["x", "w", *(["b"] if bias_shape else [])]
    constants = {"w": (_normal(*w_shape, seed=1) / np.sqrt(terms)).astype(np.float32)}
    if bias_shape:
        constants["b"] = _normal(*bias_shape, seed=2)
    node = helper.make_node(op, inputs, ["y"], **attrs)
    # Gemm's alpha and beta scale the sum and the bias: one more rounding each
    return OpCase(id, [node], {"x": _normal(*x_shape)}, constants=constants, bound=dot(terms, 2), lpbq=lpbq)


DENSE = [
    _dense("gemm", "Gemm", (4, 64), (64, 16), bias_shape=(16,), lpbq=True),
    _dense("gemm_transB", "Gemm", (4, 64), (16, 64), transB=1, bias_shape=(1, 16), lpbq=True),
    _dense("gemm_alpha_beta_scalar_bias", "Gemm", (3, 20), (20, 7), alpha=0.5, beta=2.0, bias_shape=(1,)),
    _dense("gemm_transA", "Gemm", (20, 3), (20, 7), transA=1, bias_shape=(3, 7)),
    _dense("matmul_vector_times_matrix", "MatMul", (64,), (64, 24), lpbq=True),
    _dense("matmul_4d_times_matrix", "MatMul", (2, 3, 5, 64), (64, 8), lpbq=True),
    _dense("matmul_batched_weight", "MatMul", (3, 4, 16), (3, 16, 8)),
]


def _activations_product(id, x_shape, y_shape, terms, **einsum):
    nodes = [helper.make_node("Einsum" if einsum else "MatMul", ["a", "b"], ["y"], **einsum)]
    inputs = {"a": _normal(*x_shape), "b": _normal(*y_shape, seed=3)}
    return OpCase(id, nodes, inputs, bound=dot(terms))


PRODUCTS = [
    _activations_product("matmul_broadcast_batch", (2, 1, 4, 16), (3, 16, 5), 16),
    _activations_product("matmul_matrix_times_vector", (3, 4, 16), (16,), 16),
    _activations_product("einsum_attention_scores", (2, 4, 8, 16), (2, 4, 8, 16), 16, equation="bhqd,bhkd->bhqk"),
    _activations_product("einsum_bilinear", (3, 5), (5, 7), 5, equation="ij,jk->ik"),
    _activations_product("einsum_batch_outer", (2, 3), (2, 4), 1, equation="bi,bj->bij"),
]


@pytest.mark.parametrize("case", CONVOLUTIONS + DENSE + PRODUCTS, ids=str)
def test_products_of_weights_and_activations(case):
    check(case)
