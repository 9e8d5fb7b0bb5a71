"""lpbq_tvm.llm on a tiny random-weight Llama decoder: the compiled prefill and decode steps against an
independent float64 numpy Llama (fp32, and weight-only with the LPBQ-dequantized weights) within the float32
bound, greedy generation, seeded sampling, one copy of the weights, and clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from benchmarks.models.llama_onnx import LlamaConfig, build_decoder, presents_as_past, random_weights
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.llm import DecoderInterface, Sampling, compile_decoder
from tests.benchmarks.models.llama_reference import Decoder as OnnxDecoder
from tests.benchmarks.models.llama_reference import float32_bound, reference_logits

CONFIG = LlamaConfig.tiny()
PAST = [f"past_key_values.{i}.{kind}" for i in range(CONFIG.layers) for kind in ("key", "value")]
CONTEXT, PREFILL = 24, 6
PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, CONFIG.vocab, 9)]  # longer than PREFILL


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "tiny.onnx"
    build_decoder(CONFIG, random_weights(CONFIG, seed=1), path)
    return path


def _calibration_shapes(seq: int = 8) -> dict[str, list[int]]:
    shapes = {"input_ids": [1, seq], "attention_mask": [1, seq], "position_ids": [1, seq]}
    return shapes | {name: [1, CONFIG.kv_heads, 0, CONFIG.head_dim] for name in PAST}


@pytest.fixture(scope="module")
def sim(model_path):
    """LPBQ on every MatMul (the tied LM head included), calibrated on two token batches."""
    sim = QuantizationSimModel(model_path, input_shapes=_calibration_shapes())
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=32)
    rng = np.random.default_rng(2)
    batches = [
        sim.random_inputs(seed)
        | {"input_ids": rng.integers(0, CONFIG.vocab, (1, 8)), "attention_mask": np.ones((1, 8), np.int64)}
        | {"position_ids": np.arange(8)[None]}
        for seed in range(2)
    ]
    sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
    return sim


@pytest.fixture(scope="module")
def decoders(sim):
    return {mode: compile_decoder(sim, mode, context=CONTEXT, prefill=PREFILL) for mode in ("fp32", "weight-only")}


def _weights(sim, mode: str) -> dict[str, np.ndarray]:
    """The decoder's weights as the numpy Llama takes them: fp32, or with the LPBQ-dequantized matrices."""
    weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(sim._source).graph.initializer}
    if mode == "weight-only":
        weights |= {name: encoding.qdq_weight for name, encoding in sim.encodings.items()}
    return weights


@pytest.mark.parametrize("mode", ["fp32", "weight-only"])
def test_prefill_and_decode_steps_match_the_numpy_llama_within_the_float32_bound(decoders, sim, mode):
    """The first PREFILL positions through the prefill graph, the rest through decode steps."""
    got = decoders[mode].prefill(PROMPT)
    config = dataclasses.replace(CONFIG, tied_embeddings=False)  # the LM head: its own (quantized) matrix
    expected = reference_logits(np.array(PROMPT), _weights(sim, mode), config)
    assert got.shape == expected.shape == (len(PROMPT), CONFIG.vocab)
    np.testing.assert_allclose(got, expected, rtol=0, atol=float32_bound(CONFIG, len(PROMPT), expected))


def test_greedy_generation_follows_the_numpy_llama(decoders, sim):
    """Each generated token is the numpy Llama's argmax after the tokens before it, or within the float32
    bound of it (a near tie)."""
    decoder = decoders["fp32"]
    generated = decoder.generate(PROMPT, max_new_tokens=8)
    assert len(generated) == 8 and decoder.stats.stopped_by == "max_new_tokens"
    assert decoder.stats.prompt_tokens == len(PROMPT) and decoder.stats.new_tokens == 8
    expected = reference_logits(np.array(PROMPT + generated), _weights(sim, "fp32"), CONFIG)
    bound = float32_bound(CONFIG, len(PROMPT) + 8, expected)
    for index, token in enumerate(generated):
        row = expected[len(PROMPT) - 1 + index]
        assert row.max() - row[token] <= 2 * bound, (index, token, int(row.argmax()))


def test_greedy_generation_equals_onnxruntime_s_for_20_steps(sim, model_path):
    """onnxruntime's own KV-cache loop on the exported graph, greedy: the same 20 tokens."""
    session, tokens, past, expected = OnnxDecoder(model_path, CONFIG), PROMPT, None, []
    for _ in range(20):
        outputs = session.run([tokens], past=past, positions=None)
        tokens, past = [int(outputs["logits"][0, -1].argmax())], presents_as_past(outputs)
        expected.append(tokens[0])
    decoder = compile_decoder(sim, "fp32", context=32, prefill=PREFILL)  # 9 + 20 tokens
    assert decoder.generate(PROMPT, max_new_tokens=20) == expected


def test_a_step_s_logits_outlive_the_steps_after_it(decoders):
    """step() returns a view of its output tensor, not a copy: the steps after it must write elsewhere, and
    rewinding to the same position must give the same logits."""
    decoder = decoders["fp32"]
    decoder.prefill(PROMPT[:PREFILL])
    held = [decoder.step(token) for token in PROMPT[PREFILL:]]
    copies = [logits.copy() for logits in held]
    decoder.step(PROMPT[0])
    for logits, copy in zip(held, copies, strict=True):
        np.testing.assert_array_equal(logits, copy)
    assert not np.array_equal(held[0], held[1])
    decoder.length = PREFILL
    np.testing.assert_array_equal(decoder.step(PROMPT[PREFILL]), copies[0])


def test_a_decode_step_holds_no_input_copies(decoders):
    """The decode graph is invoked on the decoder's own tensors (its caches among them): the model keeps no
    run buffers of its inputs' shapes, which for the caches would be their size again."""
    decoder = decoders["fp32"]
    decoder.prefill(PROMPT[:PREFILL])
    decoder.step(PROMPT[PREFILL])
    assert decoder.decode_model._buffers == []


def test_stop_tokens_end_generation_and_a_full_context_stops_it(decoders):
    decoder = decoders["fp32"]
    first = decoder.generate(PROMPT, max_new_tokens=4)
    stop = first[-1]
    assert decoder.generate(PROMPT, max_new_tokens=4, stop_tokens=[stop]) == first[: first.index(stop) + 1]
    assert decoder.stats.stopped_by == "stop token"
    streamed = []
    long = decoder.generate(PROMPT, max_new_tokens=100, on_token=streamed.append)
    assert len(PROMPT) + len(long) == CONTEXT + 1 and decoder.stats.stopped_by == "context"
    assert streamed == long


def test_seeded_sampling_repeats_and_narrow_sampling_is_greedy(decoders):
    decoder = decoders["weight-only"]
    greedy = decoder.generate(PROMPT, max_new_tokens=6)
    sampled = [decoder.generate(PROMPT, 6, sampling=Sampling(temperature=1.5, seed=7)) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert decoder.generate(PROMPT, 6, sampling=Sampling(temperature=1.5, seed=8)) != sampled[0]
    assert decoder.generate(PROMPT, 6, sampling=Sampling(temperature=2.0, top_k=1, seed=1)) == greedy
    assert decoder.generate(PROMPT, 6, sampling=Sampling(temperature=2.0, top_p=1e-6, seed=1)) == greedy
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0"):
        Sampling(top_p=0)


@pytest.mark.parametrize("mode", ["w4a8", "w4a16"])
def test_integer_modes_generate_with_one_copy_of_the_weights(sim, mode):
    decoder = compile_decoder(sim, mode, context=CONTEXT, prefill=PREFILL)
    prefill, decode = decoder.prefill_model, decoder.decode_model
    assert all(any(p is q for q in prefill.params) for p in decode.params)
    assert set(decode.lowered) == set(prefill.lowered) == set(sim.encodings)  # every MatMul on LPBQ kernels
    generated = decoder.generate(PROMPT, max_new_tokens=5)
    assert len(generated) == 5 and all(0 <= t < CONFIG.vocab for t in generated)


def test_dynamic_rows_need_no_calibration_and_stay_closer_to_weight_only(model_path, sim, decoders):
    """w4a8-dynamic compiles from the weight encodings alone (no calibration data), every MatMul on the
    integer kernels, and its logits stay closer to weight-only's than w4a8's one calibrated range per tensor."""
    uncalibrated = QuantizationSimModel(model_path, input_shapes=_calibration_shapes())
    set_grouped_blockwise_quantization_for_weights(uncalibrated, op_types=("MatMul",), block_size=32)
    uncalibrated.compute_encodings()
    dynamic = compile_decoder(uncalibrated, "w4a8-dynamic", context=CONTEXT, prefill=PREFILL)
    assert set(dynamic.decode_model.lowered) == set(uncalibrated.encodings)
    assert {entry["mode"] for entry in dynamic.decode_model.lowered.values()} == {"w4a8-dynamic"}
    reference = decoders["weight-only"].prefill(PROMPT)
    static = compile_decoder(sim, "w4a8", context=CONTEXT, prefill=PREFILL).prefill(PROMPT)
    dynamic_error, static_error = (np.abs(logits - reference).max() for logits in (dynamic.prefill(PROMPT), static))
    assert dynamic_error < static_error


def test_mse_act_weighs_each_of_the_layers_that_share_an_input(model_path):
    """q, k and v (and gate, up) read one tensor: each layer's encoder gets that tensor's energy."""
    sim = QuantizationSimModel(model_path, input_shapes=_calibration_shapes())
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=32, encoder="mse-act")
    inputs = sim.random_inputs(0) | {"input_ids": np.arange(8)[None], "attention_mask": np.ones((1, 8), np.int64)}
    sim.compute_encodings(
        lambda s, data: [s.run(batch) for batch in data], [inputs | {"position_ids": np.arange(8)[None]}]
    )
    assert set(sim.encodings) == set(sim.layers)


def test_the_graphs_at_other_shapes_share_the_simulation_s_weights(sim):
    """What compile_decoder imports at the decode shapes holds no weight of its own: a 1.1 B decoder fits."""
    decode = sim.reshaped(DecoderInterface.of(sim).shapes(1, CONTEXT - 1))
    assert [i.shape for i in decode.inputs] != [i.shape for i in sim.inputs]
    assert decode.weights.keys() == sim.weights.keys()
    assert all(np.shares_memory(decode.weights[name], weight) for name, weight in sim.weights.items())


def test_bad_input_is_refused_with_the_reason(decoders, sim):
    decoder = decoders["fp32"]
    with pytest.raises(ValueError, match=f"the prompt has {CONTEXT + 1} tokens; the context holds {CONTEXT}"):
        decoder.prefill([1] * (CONTEXT + 1))
    with pytest.raises(ValueError, match=rf"token ids \[{CONFIG.vocab}\] outside the model's vocabulary"):
        decoder.prefill([1, CONFIG.vocab])
    with pytest.raises(ValueError, match=r"need 1 <= prefill <= context, got prefill=30, context=24"):
        compile_decoder(sim, "fp32", context=CONTEXT, prefill=30)
    with pytest.raises(ValueError, match=r"not a decoder with a KV cache: .* the model has inputs x and outputs y"):
        DecoderInterface.of(QuantizationSimModel(build_example_model()))
