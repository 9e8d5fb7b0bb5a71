"""GroupedAttention: the tiny Llama decoder's repeat_kv matmuls become grouped matmuls by the shared KV heads
(no broadcast of the cache left), computing the same logits and presents bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from ir import relax_calls

from benchmarks.models.llama_onnx import LlamaConfig, build_decoder, random_weights
from lpbq_tvm.compiler import build, lower
from lpbq_tvm.llm import DecoderInterface, decoder_sim
from lpbq_tvm.passes.grouped_attention import GroupedAttention

CONFIG = LlamaConfig.tiny()  # 4 query heads share 2 KV heads
PLAIN = "default_build"  # TVM's lowering alone: the pass under test is the only rewrite applied


@pytest.fixture(scope="module")
def decode_step(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "tiny.onnx"
    build_decoder(CONFIG, random_weights(CONFIG, seed=6), path)
    sim = decoder_sim(path, 1)
    return sim.reshaped(DecoderInterface.of(sim).shapes(1, 11))


def test_the_repeated_heads_are_gone_and_the_step_computes_the_same_bits(decode_step):
    before = lower(decode_step, "cpu", "fp32")
    after = GroupedAttention()(before)
    assert len(relax_calls(before, "relax.broadcast_to")) == 2 * CONFIG.layers
    assert not relax_calls(after, "relax.broadcast_to")
    assert len(relax_calls(after, "relax.matmul")) == len(relax_calls(before, "relax.matmul"))
    rng = np.random.default_rng(1)
    inputs = {
        "input_ids": np.array([[3]]),
        "attention_mask": np.ones((1, 12), np.int64),
        "position_ids": np.array([[11]]),
    }
    inputs |= {
        name: rng.standard_normal((1, CONFIG.kv_heads, 11, CONFIG.head_dim)).astype(np.float32)
        for name in DecoderInterface.of(decode_step).past
    }
    expected = build(before, "cpu", pipeline=PLAIN).run(inputs)
    actual = build(after, "cpu", pipeline=PLAIN).run(inputs)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name].view(np.int32), value.view(np.int32), err_msg=name)
