"""benchmarks/models/llama_onnx.py: the tiny Llama decoder in onnxruntime against a float64 numpy Llama written
from the model's equations, its KV cache and padding mask, and its ONNX interface."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from llama_reference import Decoder, float32_bound, reference_logits

from benchmarks.models import llama_onnx
from benchmarks.models.llama_onnx import (
    LlamaConfig,
    build_decoder,
    check_weights,
    empty_past,
    presents_as_past,
    random_weights,
    weight_shapes,
)

CONFIG = LlamaConfig.tiny()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    weights = random_weights(CONFIG, seed=0)
    path = build_decoder(CONFIG, weights, tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return path, weights, Decoder(path, CONFIG)


@pytest.mark.parametrize(
    ("tied", "opset"),
    [(True, 18), (True, 17), (True, 21), (False, 18)],
    ids=["tied-18", "tied-17", "tied-21", "untied"],
)
def test_logits_match_a_numpy_llama(tied, opset, tmp_path):
    config = dataclasses.replace(CONFIG, tied_embeddings=tied)
    weights = random_weights(config, seed=1)
    decoder = Decoder(build_decoder(config, weights, tmp_path / "model.onnx", opset=opset), config)
    tokens = np.random.default_rng(2).integers(0, config.vocab, size=(2, 11))
    logits = decoder.run(tokens)["logits"]
    for row, sequence in zip(logits, tokens, strict=True):
        reference = reference_logits(sequence, weights, config)
        assert float(reference.std()) > 0.3  # logits of unit scale, not a degenerate network
        np.testing.assert_allclose(row, reference, rtol=0, atol=float32_bound(config, len(sequence), reference))


def test_cache_continues_the_prompt(tiny):
    """The prompt at once equals the prompt less its last token, then that token with the cache."""
    _, _, decoder = tiny
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab, size=(2, 9))
    whole = decoder.run(tokens)
    first = decoder.run(tokens[:, :-1])
    assert first["present.1.value"].shape == (2, CONFIG.kv_heads, 8, CONFIG.head_dim)
    step = decoder.run(tokens[:, -1:], past=presents_as_past(first))
    scale = float(np.abs(whole["logits"]).max())
    np.testing.assert_allclose(step["logits"][:, 0], whole["logits"][:, -1], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(first["logits"], whole["logits"][:, :-1], rtol=0, atol=1e-5 * scale)
    for name in (f"present.{layer}.{kind}" for layer in range(CONFIG.layers) for kind in ("key", "value")):
        np.testing.assert_allclose(step[name], whole[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_left_padding_is_masked_out(tiny):
    """Row 1 of a batch is 3 pad tokens then a shorter prompt: its logits and next step equal that prompt's
    alone, and row 0's equal its own alone, both for the prompt and for one cached step after it."""
    _, _, decoder = tiny
    rng = np.random.default_rng(4)
    long, short, pad = rng.integers(3, CONFIG.vocab, size=8), rng.integers(3, CONFIG.vocab, size=5), 3
    tokens = np.stack([long, np.concatenate([np.zeros(pad, np.int64), short])])
    mask = np.array([[1] * 8, [0] * pad + [1] * 5])
    positions = np.array([np.arange(8), [0] * pad + list(range(5))])
    batch = decoder.run(tokens, mask=mask, positions=positions)
    alone = [decoder.run(long[None]), decoder.run(short[None])]
    np.testing.assert_allclose(batch["logits"][0], alone[0]["logits"][0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch["logits"][1, pad:], alone[1]["logits"][0], rtol=0, atol=1e-5)

    following = rng.integers(3, CONFIG.vocab, size=(2, 1))
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step = decoder.run(following, mask=step_mask, positions=np.array([[8], [5]]), past=presents_as_past(batch))
    for row, single in enumerate(alone):
        expected = decoder.run(following[row : row + 1], past=presents_as_past(single))["logits"][0]
        np.testing.assert_allclose(step["logits"][row], expected, rtol=0, atol=1e-5, err_msg=f"row {row}")
    assert not np.allclose(step["logits"][1], decoder.run(following[1:], past=empty_past(CONFIG, 1))["logits"][0])


def test_large_models_keep_their_weights_beside(tiny, tmp_path, monkeypatch):
    """Past EXTERNAL_DATA_BYTES the tensors go to ``<name>.data``; the model still loads and computes the same."""
    _, weights, decoder = tiny
    monkeypatch.setattr(llama_onnx, "EXTERNAL_DATA_BYTES", 0)
    path = build_decoder(CONFIG, weights, tmp_path / "split.onnx")
    assert (tmp_path / "split.onnx.data").stat().st_size > sum(value.nbytes for value in weights.values())
    assert path.stat().st_size < 100_000
    tokens = np.arange(6)[None]
    np.testing.assert_array_equal(Decoder(path, CONFIG).run(tokens)["logits"], decoder.run(tokens)["logits"])


def test_interface_and_checker(tiny):
    path, _, _ = tiny
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)

    def signature(values):
        return {
            v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        }

    f32, i64, kv, d = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, CONFIG.kv_heads, CONFIG.head_dim
    cache = [(layer, kind) for layer in range(CONFIG.layers) for kind in ("key", "value")]
    assert signature(model.graph.input) == {
        "input_ids": (i64, ["batch", "seq"]),
        "attention_mask": (i64, ["batch", "total"]),
        "position_ids": (i64, ["batch", "seq"]),
    } | {f"past_key_values.{layer}.{kind}": (f32, ["batch", kv, "past", d]) for layer, kind in cache}
    assert signature(model.graph.output) == {"logits": (f32, ["batch", "seq", CONFIG.vocab])} | {
        f"present.{layer}.{kind}": (f32, ["batch", kv, "total", d]) for layer, kind in cache
    }


def test_graph_is_made_of_plain_onnx_ops(tiny):
    """Standard-domain ops only, RMSNorm written out, and each projection a MatMul by an [in, out] initializer
    named after the Hugging Face parameter (the tied head a transposed copy of the embedding)."""
    path, weights, _ = tiny
    model = onnx.load(path)
    op_types = {node.op_type for node in model.graph.node}
    assert {node.domain for node in model.graph.node} == {""}
    assert {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Range", "Where", "Expand", "Softmax", "Sigmoid"} <= op_types
    assert not op_types & {"LayerNormalization", "SimplifiedLayerNormalization", "Attention", "RotaryEmbedding"}
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    matmuls = [node.input[1] for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]
    assert len(matmuls) == 7 * CONFIG.layers + 1
    assert "model.layers.1.self_attn.k_proj.weight" in matmuls
    k_proj = initializers["model.layers.1.self_attn.k_proj.weight"]
    assert k_proj.shape == (CONFIG.hidden, CONFIG.kv_heads * CONFIG.head_dim)
    np.testing.assert_array_equal(initializers["lm_head.weight"], weights["model.embed_tokens.weight"].T)


def test_misshapen_weights_are_named():
    weights = random_weights(CONFIG)
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"].T
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: expected float32 \(128, 256\)"):
        check_weights(CONFIG, weights)
    del weights["model.norm.weight"]
    with pytest.raises(ValueError, match=r"lack 1 tensors, e\.g\. model\.norm\.weight of shape \(128,\)"):
        check_weights(CONFIG, weights)


@pytest.mark.parametrize(
    ("config", "parameters"),
    [(LlamaConfig.smollm2_135m(), 134_515_008), (LlamaConfig.tinyllama_1b(), 1_100_048_384)],
)
def test_named_configs_have_their_model_s_parameter_count(config, parameters):
    """SmolLM2-135M and TinyLlama-1.1B as their model cards count them (a tied head counted once)."""
    assert sum(int(np.prod(shape)) for shape in weight_shapes(config).values()) == parameters
