"""The error-minimising encoders (mse, mse-act): never worse than AIMET's rule, same format, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from test_encoder import lpbq_problems

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.exports.aimet_json import param_entry
from lpbq_tvm.packing import pack, unpack


def _canonical_blocks(array, encoding):
    """``array`` (the weight's layout) as ``[C, nb, elements of a block]``."""
    canonical = np.moveaxis(array, (encoding.channel_axis, encoding.block_axis), (0, 1))
    return canonical.reshape(encoding.num_channels, encoding.num_blocks, -1)


def _group_errors(weight, encoding, importance=None):
    """Squared error per (channel, group) of an encoding, optionally weighted per input channel."""
    diff = np.square(weight.astype(np.float64) - encoding.qdq_weight)
    if importance is not None:
        shape = [1] * weight.ndim
        shape[encoding.block_axis] = -1
        diff = diff * importance.reshape(shape)
    per_block = _canonical_blocks(diff, encoding).sum(axis=2)
    groups = encoding.float_scale.shape[1]
    return per_block.reshape(encoding.num_channels, groups, -1).sum(axis=2)


def _magnitude_weighted_group_errors(weight, encoding):
    """``Σ (|w| + rms of w's block) · (w - qdq)²`` per (channel, group): the error ``mse`` minimises."""
    blocks = _canonical_blocks(weight.astype(np.float64), encoding)
    diff = np.square(blocks - _canonical_blocks(encoding.qdq_weight, encoding))
    rms = np.sqrt(np.mean(np.square(blocks), axis=2, keepdims=True))
    per_block = ((np.abs(blocks) + rms) * diff).sum(axis=2)
    groups = encoding.float_scale.shape[1]
    return per_block.reshape(encoding.num_channels, groups, -1).sum(axis=2)


@settings(max_examples=150, deadline=None)
@given(lpbq_problems())
def test_mse_is_never_worse_than_aimet_on_any_group(problem):
    weight, channel_axis, block_axis, config = problem
    settings_ = {k: v for k, v in config.as_dict().items() if k != "encoder"}
    aimet = encode_lpbq(weight, channel_axis, block_axis, **settings_)
    mse = encode_lpbq(weight, channel_axis, block_axis, **settings_, encoder="mse")
    # the search works in float32; its choice never loses by more than float32 rounding of the sums
    mse_error, aimet_error = (_magnitude_weighted_group_errors(weight, e) for e in (mse, aimet))
    assert (mse_error <= aimet_error * (1 + 1e-5)).all()
    k = mse.per_block_int_scale
    assert k.min() >= 1 and k.max() <= config.max_int_scale
    half = 1 << (config.bitwidth - 1)
    assert mse.int_weight.min() >= -half and mse.int_weight.max() <= half - 1
    if config.bitwidth <= 4 and config.decompressed_bw - config.bitwidth <= 4 and mse.float_scale.shape[1] == 1:
        q, k_unpacked, s = unpack(pack(mse))
        np.testing.assert_array_equal(q, mse.canonical_int_weight())
        np.testing.assert_array_equal(k_unpacked, k)


def test_mse_improves_gaussian_weights_and_is_deterministic():
    weight = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    first, second = (encode_lpbq(weight, 1, 0, encoder="mse") for _ in range(2))
    np.testing.assert_array_equal(first.int_weight, second.int_weight)
    np.testing.assert_array_equal(first.float_scale, second.float_scale)
    aimet = encode_lpbq(weight, 1, 0)
    assert _group_errors(weight, first).sum() < 0.9 * _group_errors(weight, aimet).sum()  # > 0.45 dB better
    assert first.config.encoder == "mse" and param_entry("w", first)["enc_type"] == "LPBQ"


def test_mse_act_minimises_the_weighted_error():
    """With one block 1000x more important, mse-act trades the others' error for that block's."""
    rng = np.random.default_rng(1)
    weight = rng.standard_t(3, (256, 64)).astype(np.float32)  # MatMul [in, out]
    importance = np.ones(256, np.float32)
    importance[64:128] = 1000.0
    mse = encode_lpbq(weight, 1, 0, encoder="mse")
    act = encode_lpbq(weight, 1, 0, encoder="mse-act", importance=importance)
    aimet = encode_lpbq(weight, 1, 0)
    assert (_group_errors(weight, act, importance) <= _group_errors(weight, aimet, importance)).all()
    assert _group_errors(weight, act, importance).sum() < _group_errors(weight, mse, importance).sum()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "gptq"}, "unknown encoder 'gptq'; known: aimet, mse, mse-act"),
        ({"encoder": "mse-act"}, "encoder 'mse-act' needs an importance per input channel"),
        ({"encoder": "mse", "importance": np.ones(128)}, "encoder 'mse-act' needs an importance"),
        ({"encoder": "mse-act", "importance": np.ones(3)}, "importance must be 128 finite non-negative values"),
    ],
)
def test_encoder_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_lpbq(np.ones((8, 128), np.float32), 0, 1, **kwargs)


def test_sim_mse_act_uses_calibration_data():
    data = [{"x": np.random.default_rng(s).standard_normal((1, 64, 8, 8)).astype(np.float32)} for s in range(3)]
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim, encoder="mse-act")
    with pytest.raises(ValueError, match=r"encoder mse-act weighs errors by calibration data: pass a callback"):
        sim.compute_encodings()
    sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], data)
    assert {row.encoder for row in sim.report()} == {"mse-act"}
    assert sim.is_calibrated
