"""A float64 numpy Llama written from the model's equations, the float32 error bound to compare with it, and an
onnxruntime runner of llama_onnx's decoder interface; shared by the decoder tests."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from benchmarks.models.llama_onnx import LlamaConfig, empty_past

UNIT_ROUNDOFF = 2.0**-24  # float32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rotate_pairs(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """RoPE on [seq, head_dim]: the pair (x[i], x[i + head_dim / 2]) turned by the angle p * theta^(-2i / head_dim)."""
    half = x.shape[-1] // 2
    angle = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], axis=-1)


def reference_attention(x: np.ndarray, w: dict, layer: int, config: LlamaConfig) -> np.ndarray:
    """Causal grouped-query attention of one sequence [seq, hidden]: query head h reads KV head
    h // (heads / kv_heads), query i attends to keys 0..i."""
    prefix, d = f"model.layers.{layer}.self_attn", config.head_dim
    positions = np.arange(len(x), dtype=np.float64)
    q, k, v = (x @ w[f"{prefix}.{name}_proj.weight"] for name in "qkv")
    heads = []
    for h in range(config.heads):
        g = h // (config.heads // config.kv_heads)
        qh = rotate_pairs(q[:, h * d : (h + 1) * d], positions, config.rope_theta)
        kh = rotate_pairs(k[:, g * d : (g + 1) * d], positions, config.rope_theta)
        out = np.empty((len(x), d))
        for i in range(len(x)):
            scores = kh[: i + 1] @ qh[i] / math.sqrt(d)
            weights = np.exp(scores - scores.max())
            out[i] = weights @ v[: i + 1, g * d : (g + 1) * d] / weights.sum()
        heads.append(out)
    return np.concatenate(heads, axis=-1) @ w[f"{prefix}.o_proj.weight"]


def reference_logits(tokens: np.ndarray, weights: dict[str, np.ndarray], config: LlamaConfig) -> np.ndarray:
    """Llama's forward pass for one sequence in float64, without a cache: [seq, vocab]."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    x = w["model.embed_tokens.weight"][tokens]
    for layer in range(config.layers):
        prefix = f"model.layers.{layer}"
        h = rms_norm(x, w[f"{prefix}.input_layernorm.weight"], config.rms_eps)
        x = x + reference_attention(h, w, layer, config)
        h = rms_norm(x, w[f"{prefix}.post_attention_layernorm.weight"], config.rms_eps)
        gate, up = h @ w[f"{prefix}.mlp.gate_proj.weight"], h @ w[f"{prefix}.mlp.up_proj.weight"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{prefix}.mlp.down_proj.weight"]
    head = w["model.embed_tokens.weight"].T if config.tied_embeddings else w["lm_head.weight"]
    return rms_norm(x, w["model.norm.weight"], config.rms_eps) @ head


def float32_bound(config: LlamaConfig, seq: int, reference: np.ndarray) -> float:
    """float32 against exact math: each dot product of length K errs by at most (K + 4) u of its magnitude
    (Higham), summed over the dot products an output passes through (q/k/v, scores, context, o_proj,
    gate/up, down per layer, and the head), to first order and without amplification between layers,
    relative to the largest logit (tests/model_builders.py's reordering_bound, one-sided: the reference is
    float64)."""
    c = config
    per_layer = 3 * c.hidden + c.head_dim + seq + c.heads * c.head_dim + 2 * c.hidden + c.ffn + 8 * 4
    terms = c.layers * per_layer + c.hidden + 4
    return terms * UNIT_ROUNDOFF * float(np.abs(reference).max())


class Decoder:
    """An onnxruntime session of a decoder; ``run`` returns its outputs by name."""

    def __init__(self, path, config: LlamaConfig):
        self.config = config
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [output.name for output in self.session.get_outputs()]

    def run(self, tokens, *, mask=None, positions=None, past=None) -> dict[str, np.ndarray]:
        tokens = np.asarray(tokens, np.int64)
        batch, seq = tokens.shape
        past = past if past is not None else empty_past(self.config, batch)
        total = seq + past["past_key_values.0.key"].shape[2]
        mask = np.ones((batch, total), np.int64) if mask is None else np.asarray(mask, np.int64)
        positions = np.tile(np.arange(total - seq, total), (batch, 1)) if positions is None else positions
        feeds = {"input_ids": tokens, "attention_mask": mask, "position_ids": np.asarray(positions, np.int64)}
        return dict(zip(self.names, self.session.run(None, feeds | past), strict=True))
