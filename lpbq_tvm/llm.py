"""Decoder LLMs: an ONNX causal language model with a KV cache, compiled into a prefill and a decode step.

Where it sits: after the AIMET-style workflow (a :class:`~lpbq_tvm.quantsim.QuantizationSimModel`
with its encodings and, for W4A8 / W4A16, calibrated ranges), in place of ``lpbq_tvm.compile``::

    sim = QuantizationSimModel("model.onnx", input_shapes=...)       # any shapes: e.g. calibration's
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=64)
    sim.compute_encodings(callback, batches)
    decoder = lpbq_tvm.llm.compile_decoder(sim, "weight-only", context=512, prefill=64)
    tokens = decoder.generate(prompt_ids, max_new_tokens=32, stop_tokens=[2])

The model is what Hugging Face / torch exporters write (docs/llm.md): inputs ``input_ids``,
``attention_mask``, optionally ``position_ids``, and ``past_key_values.N.key`` / ``.value``
``[batch, kv_heads, past, head_dim]``; outputs ``logits`` and ``present.N.key`` / ``.value``.

Two static graphs share one set of weights, as Qualcomm's AR-N / AR-1 graphs do, so that every LPBQ
layer runs on the target's scheduled kernels at a known number of rows:

* *prefill*: ``prefill`` positions (a right-padded prompt) from an empty cache (past of length 0):
  logits of every position and the presents, which the generator copies into its caches once;
* *decode*: one position over a cache of ``context`` slots, its ``concat(past, new)`` rewritten by
  :class:`~lpbq_tvm.passes.kv_cache_in_place.KVCacheInPlace`: each step writes its key and value into
  the caches in place and attends over all ``context`` slots, the unwritten ones masked. The key
  caches are held transposed, ``[1, kv_heads, head_dim, context]``, as attention reads them (no
  transposed copy of every key per step); the step returns its logits only. A step's
  attention reads the whole cache whatever the context so far: at ``context`` slots per layer,
  ``2 · kv_heads · head_dim · context`` floats.

A prompt longer than ``prefill`` continues token by token through the decode step. Batch 1.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import onnx
import tvm
from tvm import relax

from lpbq_tvm.bundle import numpy_view
from lpbq_tvm.compiler import CompiledModel, build, lower
from lpbq_tvm.compiler import compile as compile_model
from lpbq_tvm.huge_pages import huge_page_zeros
from lpbq_tvm.onnx_model import value_info_shape
from lpbq_tvm.passes.kv_cache_in_place import SLOT_INPUT, KVCacheInPlace
from lpbq_tvm.targets import get_target

__all__ = [
    "Decoder",
    "DecoderInterface",
    "GenerationStats",
    "Sampling",
    "compile_decoder",
    "decoder_sim",
    "sequence_nll",
]

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


@dataclass(frozen=True)
class DecoderInterface:
    """The names and cache geometry of an exported decoder (module docstring)."""

    past: tuple[str, ...]  # past_key_values.N.key / .value, by layer
    presents: tuple[str, ...]  # present.N.key / .value, in the same order
    kv_heads: int
    head_dim: int
    has_position_ids: bool

    @classmethod
    def of(cls, sim) -> DecoderInterface:
        """The interface of ``sim``'s model; ``ValueError`` naming what is missing otherwise."""
        return cls.of_signature({info.name: info.shape for info in sim.inputs}, [info.name for info in sim.outputs])

    @classmethod
    def of_onnx(cls, path: str | PathLike) -> DecoderInterface:
        """The interface of the ONNX file at ``path`` (its graph only: external data is not read)."""
        graph = onnx.load(str(path), load_external_data=False).graph
        inputs = {vi.name: tuple(value_info_shape(vi)) for vi in graph.input}
        return cls.of_signature(inputs, [vi.name for vi in graph.output])

    @classmethod
    def of_signature(cls, inputs: Mapping[str, Sequence], outputs: Sequence[str]) -> DecoderInterface:
        """The interface of a model with these input shapes (by name) and output names."""
        past = sorted((name for name in inputs if _PAST.fullmatch(name)), key=_layer_order)
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        if not past or missing or "logits" not in outputs:
            msg = (
                "not a decoder with a KV cache: it needs inputs input_ids, attention_mask and "
                f"past_key_values.N.key / .value, output logits; the model has inputs {', '.join(inputs)} "
                f"and outputs {', '.join(outputs)}"
            )
            raise ValueError(msg)
        presents = tuple(name.replace("past_key_values.", "present.") for name in past)
        absent = [name for name in presents if name not in outputs]
        if absent:
            raise ValueError(f"the model has no outputs {', '.join(absent)} for its past_key_values inputs")
        geometry = {_heads_and_size(inputs[name]) for name in past}
        if len(geometry) != 1 or None in geometry:
            shapes = sorted({str(list(inputs[name])) for name in past})
            raise ValueError(f"past_key_values inputs need one static [batch, heads, past, head size]: {shapes}")
        ((kv_heads, head_dim),) = geometry
        return cls(tuple(past), presents, kv_heads, head_dim, "position_ids" in inputs)

    @property
    def keys(self) -> tuple[str, ...]:
        """The key caches (``past_key_values.N.key``): a decode step holds them transposed."""
        return tuple(name for name in self.past if name.endswith(".key"))

    def shapes(self, positions: int, past: int) -> dict[str, list[int]]:
        """Input shapes of a graph of ``positions`` new positions after ``past`` cached ones (batch 1)."""
        shapes = {"input_ids": [1, positions], "attention_mask": [1, past + positions]}
        if self.has_position_ids:
            shapes["position_ids"] = [1, positions]
        return shapes | {name: [1, self.kv_heads, past, self.head_dim] for name in self.past}

    def token_inputs(self, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        """Inputs of a graph of ``len(tokens)`` positions after an empty past: a calibration batch."""
        n = len(tokens)
        inputs = {"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, n), np.int64)}
        if self.has_position_ids:
            inputs["position_ids"] = np.arange(n, dtype=np.int64)[None]
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return inputs | dict.fromkeys(self.past, empty)


def decoder_sim(model: str | PathLike, positions: int = 16):
    """A :class:`~lpbq_tvm.quantsim.QuantizationSimModel` of the decoder at ``model`` for ``positions`` tokens
    after an empty past (batch 1): the shapes to encode and calibrate at. :func:`compile_decoder` imports the
    graphs it builds at their own shapes."""
    from lpbq_tvm.quantsim import QuantizationSimModel

    return QuantizationSimModel(model, input_shapes=DecoderInterface.of_onnx(model).shapes(positions, 0))


def _heads_and_size(shape: Sequence) -> tuple[int, int] | None:
    """(heads, head size) of a cache shape [batch, heads, past, head size] where both are static."""
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in (shape[1], shape[3])):
        return None
    return int(shape[1]), int(shape[3])


def _layer_order(name: str) -> tuple[int, int]:
    layer, kind = _PAST.fullmatch(name).groups()
    return int(layer), kind == "value"


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy at ``temperature`` 0, else from the softmax of logits /
    temperature, restricted to the ``top_k`` most likely and the smallest set whose probability
    reaches ``top_p``; ``seed`` makes a run repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"temperature must be >= 0 and top_k >= 1, got {self.temperature}, {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def chooser(self) -> Callable[[np.ndarray], int]:
        """A function of a logits vector to the next token, with its own random stream."""
        if self.temperature == 0:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> int:
            scaled = logits.astype(np.float64) / self.temperature
            order = np.argsort(-scaled, kind="stable")[: self.top_k]
            probabilities = np.exp(scaled[order] - scaled[order[0]])
            probabilities /= probabilities.sum()
            if self.top_p is not None:
                keep = int(np.searchsorted(np.cumsum(probabilities), self.top_p)) + 1
                order, probabilities = order[:keep], probabilities[:keep] / probabilities[:keep].sum()
            return int(rng.choice(order, p=probabilities))

        return choose


@dataclass
class GenerationStats:
    """What the last :meth:`Decoder.generate` did: tokens and seconds of its prefill and decode steps."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    stopped_by: str = ""  # "stop token", "max_new_tokens" or "context"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Decoder:
    """A compiled decoder and its KV caches (module docstring). Not for concurrent use."""

    prefill_model: CompiledModel
    decode_model: CompiledModel
    interface: DecoderInterface
    context: int
    prefill_positions: int
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        shape = (1, self.interface.kv_heads, self.context, self.interface.head_dim)
        keys = set(self.interface.keys)
        # Zeros, not uninitialized memory: a masked slot must hold finite values (NaN · 0 is NaN). In huge
        # pages, as the weights: a decode step reads the caches' filled part whole.
        shapes = [(_transposed(shape) if name in keys else shape, "float32") for name in self.interface.past]
        self._caches = dict(zip(self.interface.past, huge_page_zeros(shapes), strict=True))
        self._cache_views = {name: numpy_view(cache) for name, cache in self._caches.items()}  # prefill writes
        self._order = [info.name for info in self.decode_model.inputs]  # the decode step's inputs
        # Its token inputs live across steps, written through numpy views: a fresh tensor per input and
        # step (allocated, copied, freed) cost more than a layer's kernels (docs/performance.md).
        tokens = [info for info in self.decode_model.inputs if info.name not in self._caches]
        buffers = {info.name: tvm.runtime.empty(info.shape, info.dtype) for info in tokens}
        self._step_inputs = {name: numpy_view(buffer) for name, buffer in buffers.items()}
        self._arguments = [(buffers | self._caches)[name] for name in self._order]
        self._slots = np.arange(self.context)
        self.length = 0  # positions in the caches

    @property
    def vocab(self) -> int:
        return int(self.decode_model.outputs[0].shape[-1])

    def reset(self) -> None:
        """Forget the context: the next call starts a new sequence. The caches keep their finite values; the
        attention mask hides every slot not written since."""
        self.length = 0

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Run a new sequence's prompt; the logits of each of its positions, ``[len(tokens), vocab]``."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) > self.context:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the context holds {self.context}")
        self._check_tokens(tokens)
        self.reset()
        first = tokens[: self.prefill_positions]
        logits = [self._prefill_chunk(first)]
        logits += [self.step(token)[None] for token in tokens[len(first) :]]
        return np.concatenate(logits)

    def step(self, token: int) -> np.ndarray:
        """Append one token to the sequence; the logits of the next, ``[vocab]``: a view of the step's own
        output tensor (no copy; a later step writes elsewhere while the array is alive)."""
        if self.length >= self.context:
            raise ValueError(f"the context of {self.context} tokens is full")
        self._check_tokens([token])
        slot = self.length
        values = {"input_ids": token, "attention_mask": self._slots <= slot, "position_ids": slot, SLOT_INPUT: slot}
        for name, view in self._step_inputs.items():
            view[...] = values[name]
        (logits,) = self.decode_model.invoke(*self._arguments)
        self.length += 1
        return numpy_view(logits).reshape(-1)

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        stop_tokens: Sequence[int] = (),
        sampling: Sampling = Sampling(),
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """The tokens after ``prompt`` (a new sequence), up to ``max_new_tokens``, a stop token (included)
        or a full context; each passed to ``on_token`` as it is chosen. :attr:`stats` says how it went."""
        choose, stops = sampling.chooser(), set(stop_tokens)
        start = time.perf_counter()
        logits = self.prefill(prompt)[-1]
        self.stats = GenerationStats(len(prompt), time.perf_counter() - start, stopped_by="max_new_tokens")
        start, generated = time.perf_counter(), []
        while len(generated) < max_new_tokens:
            token = choose(logits)
            generated.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or self.length >= self.context:
                self.stats.stopped_by = "stop token" if token in stops else "context"
                break
            if len(generated) < max_new_tokens:
                logits = self.step(token)
        self.stats.new_tokens, self.stats.decode_seconds = len(generated), time.perf_counter() - start
        return generated

    def perplexity(self, tokens: Sequence[int], window: int) -> float:
        """``exp`` of the mean negative log-likelihood of ``tokens`` in consecutive windows of ``window``
        tokens, each a new sequence (its first token is context only; a last partial window counts)."""
        if not 2 <= window <= self.context:
            raise ValueError(f"the window must hold 2..{self.context} tokens (the context), got {window}")
        nll, count = 0.0, 0
        for start in range(0, len(tokens) - 1, window):
            chunk = list(tokens[start : start + window])
            if len(chunk) < 2:
                break
            nll += sequence_nll(self.prefill(chunk), chunk)
            count += len(chunk) - 1
        if count == 0:
            raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
        return float(np.exp(nll / count))

    def _prefill_chunk(self, tokens: list[int]) -> np.ndarray:
        n, padded = len(tokens), self.prefill_positions
        inputs = {
            "input_ids": np.array([tokens + [0] * (padded - n)], np.int64),
            "attention_mask": (np.arange(padded) < n).astype(np.int64)[None],
        }
        if self.interface.has_position_ids:
            inputs["position_ids"] = np.arange(padded, dtype=np.int64)[None]
        for name in self.interface.past:
            inputs[name] = np.zeros((1, self.interface.kv_heads, 0, self.interface.head_dim), np.float32)
        outputs = self.prefill_model.run(inputs)
        keys = set(self.interface.keys)
        for name, present in zip(self.interface.past, self.interface.presents, strict=True):
            cache = self._cache_views[name]  # the prompt's n slots written in place, the rest left as they are
            if name in keys:  # held transposed: [1, heads, head size, slots]
                cache[:, :, :, :n] = _transposed(outputs[present][:, :, :n])
            else:
                cache[:, :, :n] = outputs[present][:, :, :n]
        self.length = n
        return outputs["logits"][0, :n]

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the model's vocabulary of {self.vocab}")


def _transposed(value):
    """A shape or array with its last two axes swapped (how a decode step holds its key caches)."""
    if isinstance(value, tuple):
        return (*value[:-2], value[-1], value[-2])
    return np.swapaxes(value, -1, -2)


def sequence_nll(logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Summed negative log-likelihood (nats) of ``tokens[1:]``, each under the logits ``[len(tokens), vocab]``
    of the position before it (a log-softmax in float64)."""
    before = np.asarray(logits, np.float64)[:-1]
    peak = before.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(before - peak).sum(axis=1)) + peak[:, 0]
    return float((log_z - before[np.arange(len(before)), np.asarray(tokens)[1:]]).sum())


def compile_decoder(sim, mode: str = "weight-only", *, target: str = "cpu", context: int = 256, prefill: int = 32):
    """Compile ``sim``'s decoder for ``target`` in ``mode`` (as :func:`lpbq_tvm.compile`): a prefill graph of
    ``prefill`` positions and a decode step over a KV cache of ``context`` slots, sharing their weights, both
    loaded (:meth:`~lpbq_tvm.compiler.CompiledModel.load`) when the target runs on this machine."""
    if not 1 <= prefill <= context:
        raise ValueError(f"need 1 <= prefill <= context, got prefill={prefill}, context={context}")
    interface = DecoderInterface.of(sim)
    shapes = interface.shapes(prefill, 0)
    at_prefill = all(list(info.shape) == shapes[info.name] for info in sim.inputs)
    prefill_model = compile_model(sim if at_prefill else sim.reshaped(shapes), target, mode)
    decode_sim = sim.reshaped(interface.shapes(1, context - 1))
    module = KVCacheInPlace(interface.past, transposed=interface.keys)(lower(decode_sim, target, mode))
    names = [info.name for info in decode_sim.outputs]
    logits = decode_sim.outputs[names.index("logits")]
    decode_model = build(_returning(module, names.index("logits")), target, outputs=[logits], mode=mode)
    _share_weights(prefill_model, decode_model)
    if get_target(target).device() is not None:  # (the machine code is part of compiling: not in a first token)
        prefill_model.load()
        decode_model.load()
    return Decoder(prefill_model, decode_model, interface, context, prefill)


def _returning(mod: tvm.IRModule, index: int) -> tvm.IRModule:
    """``mod`` whose ``main`` returns only its output ``index`` (a decode step's logits: the caller owns the
    caches, which the step updates in place), the computations of the other outputs removed."""
    main = mod["main"]
    body = main.body
    result = relax.BlockBuilder().normalize(
        relax.SeqExpr(body.blocks, relax.Tuple([relax.TupleGetItem(body.body, index)]))
    )
    out = mod.clone()
    out.update_func(out.get_global_var("main"), relax.Function(main.params, result, None, main.is_pure, main.attrs))
    # The output tuple's field read directly, then what only the other outputs used is gone.
    prune = [relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination(["main"])]
    return tvm.transform.Sequential(prune)(out)


def _share_weights(first: CompiledModel, second: CompiledModel) -> None:
    """Let ``second`` use ``first``'s weight tensors (one copy in memory); both graphs lower each weight
    alike, so their values must be equal, which is checked."""
    mine = dict(zip(first.param_names, first.params, strict=True))
    if set(mine) != set(second.param_names):
        differ = sorted(set(mine) ^ set(second.param_names))
        raise RuntimeError(f"the prefill and decode graphs hold different weights: {', '.join(differ[:8])}")
    for index, name in enumerate(second.param_names):
        theirs = second.params[index]
        if theirs.shape != mine[name].shape or not np.array_equal(theirs.numpy(), mine[name].numpy()):
            raise RuntimeError(f"the prefill and decode graphs lower weight {name} differently")
        second.params[index] = mine[name]
