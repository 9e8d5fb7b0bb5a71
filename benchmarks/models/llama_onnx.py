"""Llama-architecture decoder-only causal LMs written as ONNX graphs shaped like torch.onnx exports of transformers.

The model source of the decoder-LLM benchmarks and tests (docs/llm.md): a :class:`LlamaConfig`, seeded
:func:`random_weights` (or real ones: benchmarks/models/smollm2.py) and :func:`build_decoder`, which writes the
graph with its KV cache. What the graph contains is what real exports contain, so that the importer and the
quantization passes meet the same patterns:

* every projection is ``MatMul(activation, W)`` with ``W`` an initializer stored [in, out] under the name of the
  Hugging Face parameter (``model.layers.0.self_attn.q_proj.weight``); the ``weights`` dicts here hold exactly
  these initializers, so their matrices are the transposes of HF's ``nn.Linear`` weights;
* tied embeddings: the LM head multiplies by its own initializer ``lm_head.weight`` [hidden, vocab], a transposed
  copy of ``model.embed_tokens.weight``, as torch.onnx's constant folding writes the shared ``Linear`` weight; the
  file holds the table twice, like real exports;
* RMSNorm as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul; SiLU as ``x * Sigmoid(x)``;
* rotary embeddings from cos / sin tables [max_positions, head_dim] gathered by ``position_ids``, rotate-half
  with Slice, Neg and Concat;
* grouped-query attention repeating the KV heads as HF's ``repeat_kv`` does (Unsqueeze, Expand, Reshape), with
  the shapes computed at run time (Shape, Gather, Unsqueeze, Concat);
* one additive attention bias [batch, 1, seq, total] built at run time from ``attention_mask`` and a causal
  comparison of positions (Range, LessOrEqual, And, Where): 0 where a query may attend, float32's lowest value
  where not (not -inf: a fully masked row, a left-padding position, then gets uniform weights instead of NaN).

Interface (symbolic dims ``batch``, ``seq``, ``past``, ``total`` = past + seq): inputs ``input_ids``,
``attention_mask`` [batch, total], ``position_ids`` (int64) and ``past_key_values.N.key`` / ``.value`` float32
[batch, kv_heads, past, head_dim]; outputs ``logits`` [batch, seq, vocab] and ``present.N.key`` / ``.value``
[batch, kv_heads, total, head_dim], the past followed by the new positions (keys after the rotary embedding).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Above this many bytes of weights the tensors go to a side file: protobuf cannot hold 2 GiB.
EXTERNAL_DATA_BYTES = 1_500_000_000
INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama decoder, named as in the GGUF / HF configs they come from."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = True
    max_positions: int = 2048

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd: rotate-half needs two halves")

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M-Instruct), for random-weight graphs of its size."""
        return cls(
            vocab=49152,
            hidden=576,
            layers=30,
            heads=9,
            kv_heads=3,
            head_dim=64,
            ffn=1536,
            rope_theta=100000.0,
            rms_eps=1e-5,
            tied_embeddings=True,
            max_positions=8192,
        )

    @classmethod
    def tinyllama_1b(cls) -> LlamaConfig:
        """TinyLlama-1.1B's shapes (1.10 B parameters, 4.4 GB in fp32; an untied LM head), for the scale benchmark."""
        return cls(
            vocab=32000,
            hidden=2048,
            layers=22,
            heads=32,
            kv_heads=4,
            head_dim=64,
            ffn=5632,
            rope_theta=10000.0,
            rms_eps=1e-5,
            tied_embeddings=False,
            max_positions=2048,
        )

    @classmethod
    def tiny(cls) -> LlamaConfig:
        """Two layers of width 128 with grouped-query attention (4 heads, 2 KV heads): seconds in tests."""
        return cls(
            vocab=512,
            hidden=128,
            layers=2,
            heads=4,
            kv_heads=2,
            head_dim=32,
            ffn=256,
            rope_theta=10000.0,
            rms_eps=1e-5,
            tied_embeddings=True,
            max_positions=256,
        )


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The ``weights`` a decoder of ``config`` takes, by name: matrices [in, out], the embedding [vocab, hidden]."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab, c.hidden)}
    for layer in range(c.layers):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (c.hidden,),
            f"{prefix}.self_attn.q_proj.weight": (c.hidden, c.heads * c.head_dim),
            f"{prefix}.self_attn.k_proj.weight": (c.hidden, c.kv_heads * c.head_dim),
            f"{prefix}.self_attn.v_proj.weight": (c.hidden, c.kv_heads * c.head_dim),
            f"{prefix}.self_attn.o_proj.weight": (c.heads * c.head_dim, c.hidden),
            f"{prefix}.post_attention_layernorm.weight": (c.hidden,),
            f"{prefix}.mlp.gate_proj.weight": (c.hidden, c.ffn),
            f"{prefix}.mlp.up_proj.weight": (c.hidden, c.ffn),
            f"{prefix}.mlp.down_proj.weight": (c.ffn, c.hidden),
        }
    shapes["model.norm.weight"] = (c.hidden,)
    if not c.tied_embeddings:
        shapes["lm_head.weight"] = (c.hidden, c.vocab)
    return shapes


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights keeping activations near unit scale: matrices N(0, 1/in), the output projections
    (o_proj, down_proj) further divided by sqrt(2 * layers) as the residual stream sums 2 * layers of them, the
    embedding N(0, 1/hidden) (unit-scale logits through the tied head), norm weights 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            value = rng.standard_normal(shape) / math.sqrt(config.hidden)
        else:
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                value /= math.sqrt(2 * config.layers)
        weights[name] = value.astype(np.float32)
    return weights


def check_weights(config: LlamaConfig, weights: dict[str, np.ndarray]) -> None:
    """Raises ValueError naming the first missing, unexpected or misshapen tensor of ``weights``."""
    expected = weight_shapes(config)
    if missing := sorted(expected.keys() - weights.keys()):
        raise ValueError(f"weights lack {len(missing)} tensors, e.g. {missing[0]} of shape {expected[missing[0]]}")
    if unexpected := sorted(weights.keys() - expected.keys()):
        raise ValueError(f"weights has tensors the config does not use, e.g. {unexpected[0]}")
    for name, shape in expected.items():
        if weights[name].shape != shape or weights[name].dtype != np.float32:
            found = f"{weights[name].dtype} {weights[name].shape}"
            raise ValueError(f"weight {name}: expected float32 {shape}, got {found}")


def rotary_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim] of HF's LlamaRotaryEmbedding: angle p / theta^(2i / head_dim) at
    columns i and i + head_dim / 2 (the halves that rotate-half pairs)."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    angles = np.outer(np.arange(config.max_positions, dtype=np.float64), config.rope_theta**-exponents)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Graph:
    """Nodes and initializers of a graph under construction; nodes named like torch.onnx's
    (``/model/layers.0/self_attn/Mul_2``, output ``/model/layers.0/self_attn/Mul_2_output_0``)."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._uses: collections.Counter[str] = collections.Counter()

    def op(self, op_type: str, scope: str, *inputs: str, output: str | None = None, **attributes) -> str:
        """Appends one node; returns its (single) output, named ``output`` when given."""
        base = f"{scope}/{op_type}"
        count = self._uses[base]
        self._uses[base] += 1
        name = base if count == 0 else f"{base}_{count}"
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attributes))
        return output

    def const(self, scope: str, value) -> str:
        """A Constant node holding ``value`` (int64 for Python ints, float32 for floats, else its dtype)."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.op("Constant", scope, value=numpy_helper.from_array(array))

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def dim(self, scope: str, tensor: str, axis: int) -> str:
        """Dimension ``axis`` of ``tensor`` at run time, an int64 scalar (Shape, Gather)."""
        shape = self.op("Shape", scope, tensor)
        return self.op("Gather", scope, shape, self.const(scope, axis), axis=0)

    def dims(self, scope: str, *parts: str | int) -> str:
        """A 1-D int64 shape from run-time scalars (unsqueezed) and constant ints, as torch exports ``view`` sizes."""
        pieces = [
            self.const(scope, [part]) if isinstance(part, int) else self.unsqueeze(scope, part, [0]) for part in parts
        ]
        return self.op("Concat", scope, *pieces, axis=0)

    def unsqueeze(self, scope: str, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", scope, x, self.const(scope, axes))

    def reduce_mean_last(self, scope: str, x: str) -> str:
        """Mean over the last axis, kept: ``axes`` is an input from opset 18 on, an attribute before."""
        if self.opset >= 18:
            return self.op("ReduceMean", scope, x, self.const(scope, [-1]), keepdims=1)
        return self.op("ReduceMean", scope, x, axes=[-1], keepdims=1)


def _rms_norm(g: _Graph, scope: str, x: str, weight: str, eps: float) -> str:
    """``weight * x / sqrt(mean(x^2) + eps)`` as torch exports LlamaRMSNorm (x * rsqrt(...))."""
    variance = g.reduce_mean_last(scope, g.op("Pow", scope, x, g.const(scope, 2.0)))
    root = g.op("Sqrt", scope, g.op("Add", scope, variance, g.const(scope, eps)))
    normed = g.op("Mul", scope, x, g.op("Reciprocal", scope, root))
    return g.op("Mul", scope, weight, normed)


def _split_heads(g: _Graph, scope: str, x: str, batch: str, seq: str, heads: int, head_dim: int) -> str:
    """[batch, seq, heads * head_dim] to [batch, heads, seq, head_dim]."""
    split = g.op("Reshape", scope, x, g.dims(scope, batch, seq, heads, head_dim))
    return g.op("Transpose", scope, split, perm=[0, 2, 1, 3])


def _apply_rotary(g: _Graph, scope: str, x: str, cos: str, sin: str, head_dim: int) -> str:
    """``x * cos + rotate_half(x) * sin`` with rotate_half(x) = concat(-x[..., half:], x[..., :half])."""
    half = head_dim // 2
    axes = g.const(scope, [-1])
    first = g.op("Slice", scope, x, g.const(scope, [0]), g.const(scope, [half]), axes)
    second = g.op("Slice", scope, x, g.const(scope, [half]), g.const(scope, [INT64_MAX]), axes)
    rotated = g.op("Concat", scope, g.op("Neg", scope, second), first, axis=-1)
    return g.op("Add", scope, g.op("Mul", scope, x, cos), g.op("Mul", scope, rotated, sin))


def _repeat_kv(g: _Graph, scope: str, x: str, config: LlamaConfig) -> str:
    """HF's repeat_kv: [batch, kv_heads, total, head_dim] to [batch, heads, total, head_dim], each KV head
    repeated heads / kv_heads times in a row (Unsqueeze, Expand, Reshape)."""
    repeats = config.heads // config.kv_heads
    if repeats == 1:
        return x
    batch, total = g.dim(scope, x, 0), g.dim(scope, x, 2)
    unsqueezed = g.unsqueeze(scope, x, [2])
    shape = g.dims(scope, batch, config.kv_heads, repeats, total, config.head_dim)
    expanded = g.op("Expand", scope, unsqueezed, shape)
    return g.op("Reshape", scope, expanded, g.dims(scope, batch, config.heads, total, config.head_dim))


def _attention(g: _Graph, layer: int, x: str, config: LlamaConfig, rotary: tuple[str, str], bias: str) -> str:
    """Self-attention of one layer with its KV cache; writes ``present.{layer}.key`` / ``.value``."""
    c, scope, prefix = config, f"/model/layers.{layer}/self_attn", f"model.layers.{layer}.self_attn"
    batch, seq = g.dim(scope, x, 0), g.dim(scope, x, 1)

    def project(name: str, heads: int) -> str:
        projected = g.op("MatMul", f"{scope}/{name}", x, f"{prefix}.{name}.weight")
        return _split_heads(g, scope, projected, batch, seq, heads, c.head_dim)

    query = _apply_rotary(g, scope, project("q_proj", c.heads), *rotary, c.head_dim)
    key = _apply_rotary(g, scope, project("k_proj", c.kv_heads), *rotary, c.head_dim)
    value = project("v_proj", c.kv_heads)
    key = g.op("Concat", scope, f"past_key_values.{layer}.key", key, axis=2, output=f"present.{layer}.key")
    value = g.op("Concat", scope, f"past_key_values.{layer}.value", value, axis=2, output=f"present.{layer}.value")

    keys_t = g.op("Transpose", scope, _repeat_kv(g, scope, key, c), perm=[0, 1, 3, 2])
    scores = g.op("Mul", scope, g.op("MatMul", scope, query, keys_t), g.const(scope, 1.0 / math.sqrt(c.head_dim)))
    probs = g.op("Softmax", scope, g.op("Add", scope, scores, bias), axis=-1)
    context = g.op("MatMul", scope, probs, _repeat_kv(g, scope, value, c))
    context = g.op("Transpose", scope, context, perm=[0, 2, 1, 3])
    merged = g.op("Reshape", scope, context, g.dims(scope, batch, seq, c.heads * c.head_dim))
    return g.op("MatMul", f"{scope}/o_proj", merged, f"{prefix}.o_proj.weight")


def _mlp(g: _Graph, layer: int, x: str) -> str:
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with silu(v) = v * sigmoid(v)."""
    scope, prefix = f"/model/layers.{layer}/mlp", f"model.layers.{layer}.mlp"
    gate = g.op("MatMul", f"{scope}/gate_proj", x, f"{prefix}.gate_proj.weight")
    activated = g.op("Mul", f"{scope}/act_fn", gate, g.op("Sigmoid", f"{scope}/act_fn", gate))
    up = g.op("MatMul", f"{scope}/up_proj", x, f"{prefix}.up_proj.weight")
    return g.op("MatMul", f"{scope}/down_proj", g.op("Mul", scope, activated, up), f"{prefix}.down_proj.weight")


def _attention_bias(g: _Graph) -> str:
    """[batch, 1, seq, total] float32: 0 where query i (absolute position past + i) may see key j, that is
    j <= past + i and attention_mask[b, j] = 1, else float32's lowest value."""
    scope = "/model"
    seq, total = g.dim(scope, "input_ids", 1), g.dim(scope, "attention_mask", 1)
    past = g.op("Sub", scope, total, seq)
    queries = g.op("Range", scope, past, total, g.const(scope, 1))
    keys = g.op("Range", scope, g.const(scope, 0), total, g.const(scope, 1))
    causal = g.unsqueeze(scope, g.op("LessOrEqual", scope, keys, g.unsqueeze(scope, queries, [1])), [0, 1])
    padding = g.op("Cast", scope, "attention_mask", to=TensorProto.BOOL)
    padding = g.unsqueeze(scope, padding, [1, 2])
    visible = g.op("And", scope, causal, padding)
    lowest = g.const(scope, np.finfo(np.float32).min)
    return g.op("Where", scope, visible, g.const(scope, 0.0), lowest)


def _decoder_nodes(g: _Graph, config: LlamaConfig) -> None:
    """Embedding, the layers and the LM head, from the graph inputs to ``logits``."""
    x = g.op("Gather", "/model/embed_tokens", "model.embed_tokens.weight", "input_ids", axis=0)
    rotary = tuple(  # [batch, 1, seq, head_dim], broadcast over the heads
        g.unsqueeze("/model/rotary_emb", g.op("Gather", "/model/rotary_emb", table, "position_ids", axis=0), [1])
        for table in ("model.rotary_emb.cos_cached", "model.rotary_emb.sin_cached")
    )
    bias = _attention_bias(g)
    for layer in range(config.layers):
        scope, prefix = f"/model/layers.{layer}", f"model.layers.{layer}"
        normed = _rms_norm(g, f"{scope}/input_layernorm", x, f"{prefix}.input_layernorm.weight", config.rms_eps)
        x = g.op("Add", scope, x, _attention(g, layer, normed, config, rotary, bias))
        normed = _rms_norm(
            g, f"{scope}/post_attention_layernorm", x, f"{prefix}.post_attention_layernorm.weight", config.rms_eps
        )
        x = g.op("Add", scope, x, _mlp(g, layer, normed))
    x = _rms_norm(g, "/model/norm", x, "model.norm.weight", config.rms_eps)
    g.op("MatMul", "/lm_head", x, "lm_head.weight", output="logits")


def _interface(config: LlamaConfig) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with the symbolic dims batch, seq, past and total."""
    c, f32, i64 = config, TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", c.vocab])]
    for layer in range(c.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{kind}", f32, ["batch", c.kv_heads, "past", c.head_dim]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{layer}.{kind}", f32, ["batch", c.kv_heads, "total", c.head_dim]
                )
            )
    return inputs, outputs


def decoder_model(config: LlamaConfig, weights: dict[str, np.ndarray], *, opset: int = 18) -> onnx.ModelProto:
    """The decoder of ``config`` as an in-memory ModelProto (see the module docstring for its form)."""
    if not 17 <= opset <= 21:
        raise ValueError(f"opset {opset}: the decoder is written for opsets 17 to 21")
    check_weights(config, weights)
    g = _Graph(opset)
    for name, array in weights.items():
        g.initializer(name, array)
    if config.tied_embeddings:
        g.initializer("lm_head.weight", np.ascontiguousarray(weights["model.embed_tokens.weight"].T))
    cos, sin = rotary_tables(config)
    g.initializer("model.rotary_emb.cos_cached", cos)
    g.initializer("model.rotary_emb.sin_cached", sin)
    _decoder_nodes(g, config)
    inputs, outputs = _interface(config)
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="lpbq_tvm benchmarks/models/llama_onnx.py",
    )


def build_decoder(config: LlamaConfig, weights: dict[str, np.ndarray], path: str | Path, *, opset: int = 18) -> Path:
    """Writes the decoder to ``path`` (weights beyond :data:`EXTERNAL_DATA_BYTES` in ``<name>.data`` beside it)
    and checks it with onnx's full checker (strict shape inference); returns ``path``."""
    path = Path(path)
    model = decoder_model(config, weights, opset=opset)
    external = sum(array.nbytes for array in weights.values()) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, path, save_as_external_data=external, all_tensors_to_one_file=True, location=f"{path.name}.data"
    )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def empty_past(config: LlamaConfig, batch: int) -> dict[str, np.ndarray]:
    """``past_key_values.*`` inputs of length 0, for a first run without a cache."""
    shape = (batch, config.kv_heads, 0, config.head_dim)
    return {
        f"past_key_values.{layer}.{kind}": np.zeros(shape, np.float32)
        for layer in range(config.layers)
        for kind in ("key", "value")
    }


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``present.*`` outputs of a run renamed as the ``past_key_values.*`` inputs of the next."""
    return {
        name.replace("present.", "past_key_values.", 1): value
        for name, value in outputs.items()
        if name.startswith("present.")
    }
