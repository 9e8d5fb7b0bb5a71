"""MergeSiblingLayers: dense layers reading one input become one layer and slices; what it computes does not
change, in fp32 before lowering and bit for bit once lowered (each channel keeps its codes and scales), but
for a bias a float kernel no longer adds in its epilogue."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import called, kernels_called
from onnx import TensorProto, helper, numpy_helper

from lpbq_tvm.compiler import build
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.frontend import import_onnx
from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ
from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ, attach_activation_ranges
from lpbq_tvm.passes.merge_sibling_layers import MergeSiblingLayers
from lpbq_tvm.targets import get_target

CPU_KERNELS = get_target("cpu").kernel_provider()
DEPTH = 128


def _siblings_model(rows: int = 5, seed: int = 0, k_shared: bool = False):
    """``x`` into q (64 channels, a bias), k and v (32 each) as MatMuls, and into two Gemms with ``transB``
    (gate, up: 96 each) whose product feeds a lone MatMul; with ``k_shared`` k's weight also multiplies a
    second input ``x2``."""
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        weight("wq", (DEPTH, 64)),
        weight("bq", (64,)),
        weight("wk", (DEPTH, 32)),
        weight("wv", (DEPTH, 32)),
        weight("wgate", (96, DEPTH)),
        weight("wup", (96, DEPTH)),
        weight("wlone", (96, 64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Gemm", ["x", "wgate"], ["gate"], name="gate_proj", transB=1),
        helper.make_node("Gemm", ["x", "wup"], ["up"], name="up_proj", transB=1),
        helper.make_node("Mul", ["gate", "up"], ["mlp"], name="swiglu"),
        helper.make_node("MatMul", ["mlp", "wlone"], ["lone"], name="lone_proj"),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, n])
        for name, n in (("q", 64), ("k", 32), ("v", 32), ("lone", 64))
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, DEPTH])]
    if k_shared:
        nodes.append(helper.make_node("MatMul", ["x2", "wk"], ["k2"], name="k2_proj"))
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [rows, DEPTH]))
        outputs.append(helper.make_tensor_value_info("k2", TensorProto.FLOAT, [rows, 32]))
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _encoded(ranges=None, k_shared: bool = False):
    model = _siblings_model(k_shared=k_shared)
    mod = EncodeLPBQ()(AnnotateLPBQ(LPBQConfig(block_size=32))(import_onnx(model).mod))
    names = ["wq", "wk", "wv", "wgate", "wup", "wlone"]
    ranges = ranges or {name: (-2.5, 3.0) for name in names}
    return attach_activation_ranges(mod, {name: {"input": ranges[name]} for name in names})


def _run(mod):
    compiled, rng = build(mod), np.random.default_rng(1)
    inputs = {info.name: rng.uniform(-2.5, 3.0, (5, DEPTH)).astype(np.float32) for info in compiled.inputs}
    return list(compiled.run(inputs).values())


def test_siblings_become_one_layer_and_slices():
    merged = MergeSiblingLayers()(_encoded())
    calls = called(merged)
    assert calls.count("relax.matmul") == 3  # q+k+v, gate+up, and the lone layer
    assert calls.count("relax.concat") == 2
    assert calls.count("relax.strided_slice") == 5
    assert MergeSiblingLayers()(merged).same_as(merged)  # nothing left to merge


def test_merging_keeps_the_float_values():
    """Before lowering the merged module computes the same fp32 products, only their order of calls differs."""
    encoded = _encoded()
    for before, after in zip(_run(encoded), _run(MergeSiblingLayers()(encoded)), strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("kernels", [None, CPU_KERNELS], ids=["generic", "cpu"])
@pytest.mark.parametrize("mode", ["weight-only", "w4a8", "w4a16", "w4a8-dynamic"])
def test_lowered_merged_layers_equal_the_layers_apart(mode, kernels):
    encoded = _encoded()
    apart = LowerLPBQ(mode, kernels=kernels)(encoded)
    merged = LowerLPBQ(mode, kernels=kernels)(MergeSiblingLayers()(encoded))
    assert len(kernels_called(merged)) < len(kernels_called(apart))
    assert not {"relax.matmul", "relax.concat"} & set(called(merged))  # every layer lowered, no fp32 concat
    (q_apart, *apart_rest), (q_merged, *merged_rest) = _run(apart), _run(merged)
    for before, after in zip(apart_rest, merged_rest, strict=True):
        np.testing.assert_array_equal(before, after)
    if mode == "weight-only":
        # q's bias: added after the slice, rounded once more than in a kernel's epilogue (where LLVM may
        # contract s * acc + b into one fused multiply-add): at most an ulp of each term apart.
        bias = numpy_helper.to_array(next(i for i in _siblings_model().graph.initializer if i.name == "bq"))
        bound = np.spacing(np.abs(q_apart)) + np.spacing(np.abs(q_apart - bias)) + np.spacing(np.abs(bias))
        assert np.all(np.abs(q_merged - q_apart) <= bound)
    else:
        np.testing.assert_array_equal(q_apart, q_merged)
    main = merged["main"]
    params = {p.name for p in main.params}
    assert not {"wq", "wk", "wv", "wgate", "wup"} & params  # no fp32 weight survives
    lowered = main.attrs["lpbq.lowered"]
    assert sorted(lowered) == ["wgate", "wk", "wlone", "wq", "wup", "wv"]  # one entry per ONNX node
    packed = [str(name) for name in lowered["wk"]["params"]]
    assert packed and all(name.startswith("wq+wk+wv.") and name in params for name in packed)
    assert [str(name) for name in lowered["wq"]["params"]] == packed  # the three layers' one set of weights
    assert str(lowered["wk"]["node"]) == "k_proj"


def test_layers_with_different_input_ranges_stay_apart():
    """Layers calibrated to different input ranges (not the same tensor, as far as the encodings go) need
    kernels of their own in an integer mode."""
    ranges = {name: (-2.5, 3.0) for name in ["wq", "wk", "wv", "wgate", "wup", "wlone"]}
    ranges["wk"] = (-2.0, 3.0)
    merged = MergeSiblingLayers()(_encoded(ranges))
    assert called(merged).count("relax.concat") == 2
    assert called(merged).count("relax.strided_slice") == 4  # q+v, gate+up


def test_layers_with_different_block_sizes_stay_apart():
    mod = import_onnx(_siblings_model()).mod
    annotated = AnnotateLPBQ(LPBQConfig(block_size=32))(mod)
    weights = dict(annotated["main"].attrs["lpbq.weights"])
    weights["wv"] = {**weights["wv"], "block_size": 64}
    main = annotated["main"].with_attr("lpbq.weights", weights)
    annotated.update_func(annotated.get_global_var("main"), main)
    merged = MergeSiblingLayers()(EncodeLPBQ()(annotated))
    assert called(merged).count("relax.strided_slice") == 4  # q+k, gate+up


def test_a_weight_another_layer_reads_too_stays_apart():
    """k's weight also multiplies ``x2``: k keeps its own layer (and LowerLPBQ its own encoding), q and v
    merge; lowered, the module computes what the layers apart do."""
    encoded = _encoded(k_shared=True)
    merged = MergeSiblingLayers()(encoded)
    assert called(merged).count("relax.strided_slice") == 4  # q+v, gate+up
    for before, after in zip(_run(LowerLPBQ("w4a8")(encoded)), _run(LowerLPBQ("w4a8")(merged)), strict=True):
        np.testing.assert_array_equal(before, after)


def test_without_encodings_nothing_changes():
    annotated = AnnotateLPBQ()(import_onnx(_siblings_model()).mod)
    assert MergeSiblingLayers()(annotated).same_as(annotated)
    assert isinstance(annotated, tvm.IRModule)
