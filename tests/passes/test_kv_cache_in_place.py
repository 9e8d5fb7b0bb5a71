"""KVCacheInPlace: a decode step's ``concat(past, new)`` becomes an in-place write into a cache one slot longer,
which computes the concat's graph bit for bit when the new position lands in the last slot; anything else
is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from ir import relax_calls
from tvm.script import relax as R

from benchmarks.models.llama_onnx import LlamaConfig, build_decoder, random_weights
from lpbq_tvm import QuantizationSimModel
from lpbq_tvm.attrs import num_inputs
from lpbq_tvm.compiler import build, lower
from lpbq_tvm.llm import _returning
from lpbq_tvm.passes.grouped_attention import GroupedAttention
from lpbq_tvm.passes.kv_cache_in_place import SLOT_INPUT, KVCacheInPlace

CONFIG = LlamaConfig.tiny()
PAST = [f"past_key_values.{i}.{kind}" for i in range(CONFIG.layers) for kind in ("key", "value")]
CONTEXT = 12


@pytest.fixture(scope="module")
def decode_step(tmp_path_factory):
    """The tiny decoder imported for one new position after CONTEXT - 1 cached ones."""
    path = tmp_path_factory.mktemp("decoder") / "tiny.onnx"
    build_decoder(CONFIG, random_weights(CONFIG, seed=3), path)
    shapes = {"input_ids": [1, 1], "attention_mask": [1, CONTEXT], "position_ids": [1, 1]}
    shapes |= {name: [1, CONFIG.kv_heads, CONTEXT - 1, CONFIG.head_dim] for name in PAST}
    return QuantizationSimModel(path, input_shapes=shapes)


def test_the_past_inputs_become_caches_one_slot_longer_and_a_slot_input_follows(decode_step):
    before = lower(decode_step, "cpu", "fp32")
    after = KVCacheInPlace(PAST)(before)
    main, count = after["main"], num_inputs(before["main"])
    names = [param.name for param in main.params]
    assert names[: count + 1] == [*names[:count], SLOT_INPUT] and num_inputs(main) == count + 1
    for param in main.params[:count]:
        if param.name in PAST:
            assert [int(d) for d in param.ty.shape] == [1, CONFIG.kv_heads, CONTEXT, CONFIG.head_dim]
    concats_of_past = [c for c in relax_calls(after, "relax.concat") if c.args[0].fields[0].name in PAST]
    assert not concats_of_past
    assert len(relax_calls(after, "relax.call_tir_inplace")) == len(PAST)


def test_with_the_new_position_in_the_last_slot_the_step_equals_the_concat_graph_bit_for_bit(decode_step):
    rng = np.random.default_rng(0)
    pasts = {
        name: rng.standard_normal((1, CONFIG.kv_heads, CONTEXT - 1, CONFIG.head_dim)).astype(np.float32)
        for name in PAST
    }
    inputs = {
        "input_ids": np.array([[7]]),
        "attention_mask": np.ones((1, CONTEXT), np.int64),
        "position_ids": np.array([[CONTEXT - 1]]),
    }
    expected = build(lower(decode_step, "cpu", "fp32"), "cpu", decode_step.inputs, decode_step.outputs).run(
        inputs | pasts
    )
    in_place = build(KVCacheInPlace(PAST)(lower(decode_step, "cpu", "fp32")), "cpu")
    pad = np.zeros((1, CONFIG.kv_heads, 1, CONFIG.head_dim), np.float32)  # the slot the step writes
    caches = {name: tvm.runtime.tensor(np.concatenate([value, pad], axis=2)) for name, value in pasts.items()}
    arguments = {name: tvm.runtime.tensor(value) for name, value in inputs.items()} | caches
    arguments[SLOT_INPUT] = tvm.runtime.tensor(np.array([CONTEXT - 1], np.int64))
    outputs = in_place.invoke(*(arguments[info.name] for info in in_place.inputs))
    np.testing.assert_array_equal(outputs[0].numpy(), expected["logits"])
    for index, name in enumerate(PAST):  # the caches now hold the presents, written in place
        present = expected[name.replace("past_key_values.", "present.")]
        np.testing.assert_array_equal(caches[name].numpy(), present)
        np.testing.assert_array_equal(outputs[1 + index].numpy(), present)


def test_transposed_key_caches_are_read_as_they_lie_and_give_the_same_bits(decode_step):
    """Key caches held [b, h, d, slots]: each step writes a column, GroupedAttention cancels the transpose
    of the transpose (one copy of every key cache fewer per step), and the logits stay bit for bit."""
    keys = [name for name in PAST if name.endswith(".key")]
    lowered = lower(decode_step, "cpu", "fp32")
    logits = [info.name for info in decode_step.outputs].index("logits")
    # as compile_decoder builds the step: the caller owns the caches, the step returns its logits
    plain = GroupedAttention()(_returning(KVCacheInPlace(PAST)(lowered), logits))
    transposed = GroupedAttention()(_returning(KVCacheInPlace(PAST, transposed=keys)(lowered), logits))
    shapes = {p.name: [int(d) for d in p.ty.shape] for p in transposed["main"].params if p.name in PAST}
    assert all(shapes[name] == [1, CONFIG.kv_heads, CONFIG.head_dim, CONTEXT] for name in keys)
    permutes = len(relax_calls(plain, "relax.permute_dims")) - len(relax_calls(transposed, "relax.permute_dims"))
    assert permutes == CONFIG.layers
    rng = np.random.default_rng(4)
    caches = {
        name: rng.standard_normal((1, CONFIG.kv_heads, CONTEXT, CONFIG.head_dim)).astype(np.float32) for name in PAST
    }
    inputs = {
        "input_ids": np.array([[5]]),
        "attention_mask": np.ones((1, CONTEXT), np.int64),
        "position_ids": np.array([[CONTEXT - 1]]),
        SLOT_INPUT: np.array([CONTEXT - 1], np.int64),
    }
    results = []
    for mod, held in ((plain, {}), (transposed, {name: np.swapaxes(caches[name], 2, 3) for name in keys})):
        compiled = build(mod, "cpu")
        arguments = {name: tvm.runtime.tensor(np.ascontiguousarray(v)) for name, v in (inputs | caches | held).items()}
        results.append(compiled.invoke(*(arguments[info.name] for info in compiled.inputs))[0].numpy())
    np.testing.assert_array_equal(results[1].view(np.int32), results[0].view(np.int32))


def _appended(positions: int, uses: int) -> tvm.IRModule:
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(past: R.Tensor((1, 2, 5, 4), "float32"), new: R.Tensor((1, 2, positions, 4), "float32")):
            with R.dataflow():
                present = R.concat((past, new), axis=2)
                doubled = R.add(past, past) if uses > 1 else R.add(new, new)
                out = (present, doubled)
                R.output(out)
            return out

    return Module


def test_a_past_appended_more_than_one_position_or_used_elsewhere_is_refused_by_name():
    with pytest.raises(ValueError, match=r"the concat of 'past' appends 2 positions; a decode step appends 1"):
        KVCacheInPlace(["past"])(_appended(2, 1))
    with pytest.raises(ValueError, match=r"past not used exactly once, as concat\(\(past, new\), axis=2\)"):
        KVCacheInPlace(["past"])(_appended(1, 2))
    with pytest.raises(ValueError, match=r"no 4-D model input cache; the inputs: past, new"):
        KVCacheInPlace(["cache"])(_appended(1, 1))
    rewritten = KVCacheInPlace(["past"])(_appended(1, 1))
    assert [int(d) for d in rewritten["main"].params[0].ty.shape] == [1, 2, 6, 4]
