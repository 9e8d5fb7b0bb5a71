"""LowerLPBQ: packed-weight kernel calls replace the layers; their outputs match the dequantized math."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import called, constants
from model_builders import (
    DEPTHWISE_CASE,
    LAYER_CASES,
    assert_float_close,
    constant_weight_module,
    dot_product_bound,
    layer_model,
    ort_run,
    with_weight,
)
from tvm.relax.frontend.onnx import from_onnx

from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.packing import packed_nbytes
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, read_encodings
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ

BLOCK_SIZE = 32


def _pipeline(mod):
    return tvm.transform.Sequential(
        [AnnotateLPBQ(LPBQConfig(block_size=BLOCK_SIZE)), EncodeLPBQ(), LowerLPBQ("weight-only")]
    )(mod)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_layer_becomes_one_packed_kernel(case):
    mod = from_onnx(layer_model(case), keep_params_in_input=True)
    lowered = _pipeline(mod)
    main = lowered["main"]
    calls = called(main)
    kernel = "lpbq_conv" if case.op_type == "Conv" else "lpbq_dense"
    assert calls.count(kernel) == 1
    assert not {"relax.matmul", "relax.nn.conv1d", "relax.nn.conv2d", "relax.permute_dims"} & set(calls)
    if case.bias:
        assert "relax.add" not in calls  # the bias is the kernel's epilogue
    params = {p.name: p for p in main.params}
    assert "w" not in params  # no fp32 copy of the weight survives
    q, k, s = params["w.lpbq_q"], params["w.lpbq_k"], params["w.lpbq_s"]
    assert (q.ty.dtype, k.ty.dtype, s.ty.dtype) == ("uint8", "uint8", "float32")
    length = int(np.prod(case.w_shape)) // case.channels
    assert [int(d) for d in q.ty.shape] == [case.channels, (length + 1) // 2]
    assert [int(d) for d in k.ty.shape] == [
        case.channels,
        (length // int(np.prod(case.w_shape[2:] or [1])) // BLOCK_SIZE + 1) // 2,
    ]
    assert len(main.attrs["params"]) == len(main.params) - int(main.attrs["num_input"])
    assert int(lowered[kernel].attrs["op_pattern"]) == 8
    assert "lpbq.encodings" not in main.attrs and "w" in main.attrs["lpbq.lowered"]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_kernel_matches_dequantized_reference(case):
    """Compiled kernel output vs onnxruntime on the LPBQ-dequantized weight, within the float32 bound."""
    model = layer_model(case, seed=1)
    mod = from_onnx(model, keep_params_in_input=True)
    encoded = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=BLOCK_SIZE))(mod))
    qdq = read_encodings(encoded["main"])["w"].qdq_weight
    x = np.random.default_rng(2).standard_normal(case.x_shape).astype(np.float32)
    reference = ort_run(with_weight(model, "w", qdq), {"x": x})["y"]
    compiled = build(LowerLPBQ()(encoded))
    (actual,) = compiled.run({"x": x}).values()
    assert actual.shape == reference.shape
    assert_float_close(actual, reference, dot_product_bound(case, x, qdq))
    expected_bytes = packed_nbytes(
        case.w_shape,
        0 if case.op_type == "Conv" or case.attrs.get("transB") else 1,
        1 if case.op_type == "Conv" or case.attrs.get("transB") else 0,
        BLOCK_SIZE,
    )
    assert compiled.weight_bytes.lpbq_packed == expected_bytes
    assert compiled.weight_bytes.float == (4 * case.channels if case.bias else 0)  # only the fp32 bias


def test_depthwise_conv_stays_fp32():
    mod = from_onnx(layer_model(DEPTHWISE_CASE), keep_params_in_input=True)
    lowered = _pipeline(mod)
    assert "relax.nn.conv2d" in called(lowered["main"])
    assert "w" in {p.name for p in lowered["main"].params}


def test_does_not_apply_without_encodings():
    mod = from_onnx(layer_model(LAYER_CASES[0]), keep_params_in_input=True)
    annotated = AnnotateLPBQ()(mod)
    assert LowerLPBQ()(annotated).same_as(annotated)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match=r"unknown LPBQ lowering mode 'int3'; known: weight-only"):
        LowerLPBQ("int3")


def test_constant_weight_becomes_packed_constants():
    value = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    Before = constant_weight_module(value)
    lowered = _pipeline(Before)
    assert called(lowered["main"]) == ["lpbq_dense"]
    assert sorted(str(c.value.dtype) for c in constants(lowered["main"].body)) == ["float32", "uint8", "uint8"]
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    (actual,) = build(lowered).run({"x": x}).values()
    encoding = read_encodings(EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=BLOCK_SIZE))(Before))["main"])
    qdq = encoding["constant0"].qdq_weight
    bound = 2 * (128 + 4) * 2.0**-24 * (np.abs(x) @ np.abs(qdq))
    assert_float_close(actual, x.astype(np.float64) @ qdq, bound)
