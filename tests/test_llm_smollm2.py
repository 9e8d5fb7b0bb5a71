"""lpbq_tvm.llm on SmolLM2-135M-Instruct (benchmarks/models/smollm2.py): compiled with LPBQ weight-only on
every MatMul, the LM head included, it still answers the chat question; the prefill and decode graphs share
one copy of the packed weights. Slow: the conversion (cached) and two compiles of a 30-layer model."""

from __future__ import annotations

import pytest

from benchmarks.models import smollm2
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.llm import DecoderInterface, compile_decoder

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]  # one worker converts the model

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def test_weight_only_smollm2_answers_the_chat_question():
    export = smollm2.build()
    config, tokenizer = export.config, export.tokenizer
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16], "position_ids": [1, 16]}
    past = [f"past_key_values.{i}.{kind}" for i in range(config.layers) for kind in ("key", "value")]
    sim = QuantizationSimModel(export.model, input_shapes=shapes | {name: [1, 3, 0, 64] for name in past})
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=64)
    sim.compute_encodings()
    assert len(sim.encodings) == 7 * config.layers + 1  # q, k, v, o, gate, up, down per layer and the head
    decoder = compile_decoder(sim, "weight-only", context=64, prefill=32)
    assert DecoderInterface.of(sim).kv_heads == 3
    assert all(any(p is q for q in decoder.prefill_model.params) for p in decoder.decode_model.params)
    answer = decoder.generate(tokenizer.encode(PROMPT).ids, 24, stop_tokens=[tokenizer.token_to_id("<|im_end|>")])
    text = tokenizer.decode(answer, skip_special_tokens=True)
    assert "Paris" in text and decoder.stats.stopped_by == "stop token", text
