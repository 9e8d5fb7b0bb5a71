"""benchmarks/models/smollm2.py's GGUF reading on small files written here as llama.cpp's convert_hf_to_gguf.py
writes a Llama (Q / K rows permuted per head, [out, in] matrices, SmolLM2's quantization types): the conversion
gives back the Hugging Face weights, and a GGUF of another architecture is refused."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from rich.console import Console

from benchmarks.models import smollm2
from benchmarks.models.llama_onnx import LlamaConfig, random_weights

CONFIG = LlamaConfig.tiny()
# convert_hf_to_gguf.py's tensor names, for the parameters of layer N.
GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *parameter, _ = hf_name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(parameter)]}.weight"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` of a Q / K weight [out, in]."""
    split = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor(hf_name: str, value: np.ndarray, config: LlamaConfig) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """What the GGUF stores for one parameter: norms F32, the embedding Q8_0, the matrices Q4_1, as HF's
    [out, in] (``value`` is [in, out]) with Q / K permuted."""
    if value.ndim == 1:
        return value, gguf.GGMLQuantizationType.F32
    if hf_name == "model.embed_tokens.weight":
        return gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    hf = np.ascontiguousarray(value.T)
    if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        hf = llama_cpp_permute(hf, config.heads if "q_proj" in hf_name else config.kv_heads)
    return gguf.quants.quantize(hf, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1


def write_gguf(path, config: LlamaConfig, weights: dict[str, np.ndarray], arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.layers)
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.hidden)
    writer.add_feed_forward_length(config.ffn)
    writer.add_head_count(config.heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"token{i}" for i in range(config.vocab)])
    for name, value in weights.items():
        data, kind = gguf_tensor(name, value, config)
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if kind == gguf.GGMLQuantizationType.F32 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_conversion_gives_back_the_hf_weights(tmp_path):
    """Q4_1 / Q8_0 quantize each stored row on its own, so the converted weight is exactly the HF weight
    quantized row by row: un-permuting must bring each row back to its HF place, and transposing to [in, out]."""
    weights = random_weights(CONFIG, seed=5)
    write_gguf(tmp_path / "tiny.gguf", CONFIG, weights)
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    config = smollm2.llama_config(reader)
    assert config == dataclasses.replace(CONFIG, rms_eps=float(np.float32(CONFIG.rms_eps)))
    converted = smollm2.gguf_weights(reader, config, Console(quiet=True))
    assert converted.keys() == weights.keys()
    for name, value in weights.items():
        kind = gguf_tensor(name, value, CONFIG)[1]
        matrix = value.ndim == 2 and name != "model.embed_tokens.weight"
        rows = gguf.quants.dequantize(gguf.quants.quantize(value.T if matrix else value, kind), kind)
        np.testing.assert_array_equal(converted[name], rows.T if matrix else rows, err_msg=name)


def test_other_architectures_are_refused(tmp_path):
    write_gguf(tmp_path / "qwen2.gguf", CONFIG, random_weights(CONFIG), arch="qwen2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'qwen2': only 'llama' is converted"):
        smollm2.llama_config(gguf.GGUFReader(tmp_path / "qwen2.gguf"))


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(12 * 64 * 5, dtype=np.float32).reshape(12 * 64, 5)
    restored = smollm2.unpermute_rotary_rows(llama_cpp_permute(weight, 12), 12)
    np.testing.assert_array_equal(restored, weight)
    assert not np.array_equal(llama_cpp_permute(weight, 12), weight)
