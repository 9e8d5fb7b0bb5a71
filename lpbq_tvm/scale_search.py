"""Error-minimising LPBQ scales in the same format: per group a float scale ``s``, per block ``k`` in 1..2**(dbw-bw).

AIMET's rule takes each block's min/max delta and snaps it to the group's grid. This search
minimises an importance-weighted squared weight error instead, all in numpy over every group at
once (``blocks`` is ``[C, nb, L]``, groups are runs of ``g`` blocks):

1. per block, the best float scale ``d*`` on a grid of fractions of the min/max delta (clipping
   the extremes of a block usually pays);
2. per group, candidate float scales ``s = max(d*) / kmax · α``; for each, every block takes the
   better of ``floor`` / ``ceil`` of ``d* / s`` (clipped to 1..kmax);
3. two refinement rounds: the least-squares ``s`` for the current codes, then ``k`` again;
4. per group the better of this result and AIMET's own, measured with the encoder's exact
   quantisation, so the result is never worse than AIMET's on any group.

The importance is what the encoders differ in. ``mse`` (no data) weights each weight's error by its
own magnitude plus its block's root mean square (:func:`magnitude_importance`, llama.cpp's rule
for quantizing without an importance matrix): a plain squared error clips a block's largest
weights whenever that lowers the sum, and large language models depend on exactly those weights
(SmolLM2's perplexity in docs/performance.md). ``mse-act`` weights each input channel's error by
the mean square of the layer's input along that channel, as activation-aware methods do.
"""

from __future__ import annotations

import numpy as np

__all__ = ["magnitude_importance", "weighted_block_error", "search_scales"]

_BLOCK_FRACTIONS = np.linspace(0.5, 1.0, 11)
_GROUP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8)
_REFINEMENTS = 2


def magnitude_importance(blocks: np.ndarray) -> np.ndarray:
    """``|w| + rms(block)`` for every weight of ``blocks`` ``[C, nb, L]``: the error weight of ``mse``."""
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=-1, keepdims=True)).astype(np.float32)
    return np.abs(blocks) + rms


def _codes(blocks: np.ndarray, scale: np.ndarray, low: int, high: int) -> np.ndarray:
    codes = blocks * (np.float32(1) / scale[..., None].astype(np.float32))
    np.rint(codes, out=codes)
    return np.clip(codes, low, high, out=codes)


def weighted_block_error(
    blocks: np.ndarray, scale: np.ndarray, low: int, high: int, importance: np.ndarray | None
) -> np.ndarray:
    """``Σ importance · (w - scale · clip(round(w / scale)))²`` per block, ``[C, nb]`` float64.

    (Rounds ``w · (1 / scale)``: a search heuristic; the encoder measures its final choice exactly.)
    """
    diff = _codes(blocks, scale, low, high)
    diff *= scale.astype(np.float32)[..., None]
    diff -= blocks
    np.square(diff, out=diff)
    if importance is not None:
        diff *= importance
    return diff.sum(axis=-1, dtype=np.float64)


def _grouped(values: np.ndarray, group: int) -> np.ndarray:
    return values.reshape(values.shape[0], -1, group)


def _best_k(blocks, best_delta, s, kmax, low, high, importance, group) -> tuple[np.ndarray, np.ndarray]:
    """Per block the better of floor/ceil(d* / s) in 1..kmax; returns (k [C, nb], group errors [C, ng])."""
    s_blocks = np.repeat(s, group, axis=1)
    ratio = best_delta / s_blocks
    k_low = np.clip(np.floor(ratio), 1, kmax)
    k_high = np.clip(k_low + 1, 1, kmax)
    e_low = weighted_block_error(blocks, k_low * s_blocks, low, high, importance)
    e_high = weighted_block_error(blocks, k_high * s_blocks, low, high, importance)
    k = np.where(e_high < e_low, k_high, k_low)
    return k, _grouped(np.minimum(e_low, e_high), group).sum(axis=2)


def search_scales(
    blocks: np.ndarray,
    delta: np.ndarray,
    float_scale: np.ndarray,
    int_scale: np.ndarray,
    bitwidth: int,
    kmax: int,
    group: int,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(float_scale [C, ng], int_scale [C, nb]) minimising the block error; see the module docstring.

    ``delta`` are the min/max block deltas and ``float_scale`` / ``int_scale`` AIMET's solution.
    The caller compares against AIMET's solution with the exact quantiser (step 4).
    """
    low, high = -(1 << (bitwidth - 1)), (1 << (bitwidth - 1)) - 1
    best_delta = delta.copy()
    best_error = weighted_block_error(blocks, delta, low, high, importance)
    for fraction in _BLOCK_FRACTIONS[:-1]:
        error = weighted_block_error(blocks, delta * fraction, low, high, importance)
        better = error < best_error
        best_delta[better], best_error[better] = delta[better] * fraction, error[better]

    top = _grouped(best_delta, group).max(axis=2) / kmax  # [C, ng]
    s, k = float_scale.copy(), int_scale.copy()
    error = _grouped(weighted_block_error(blocks, k * np.repeat(s, group, axis=1), low, high, importance), group).sum(2)
    for fraction in _GROUP_FRACTIONS:
        candidate_s = top * fraction
        candidate_k, candidate_error = _best_k(blocks, best_delta, candidate_s, kmax, low, high, importance, group)
        better = candidate_error < error
        s[better], error[better] = candidate_s[better], candidate_error[better]
        k = np.where(np.repeat(better, group, axis=1), candidate_k, k)

    for _ in range(_REFINEMENTS):
        s_blocks = np.repeat(s, group, axis=1)
        codes = _codes(blocks, k * s_blocks, low, high) * k[..., None]  # q · k
        weighted = codes if importance is None else codes * importance
        numerator = _grouped((weighted * blocks).sum(axis=-1, dtype=np.float64), group).sum(axis=2)
        denominator = _grouped((weighted * codes).sum(axis=-1, dtype=np.float64), group).sum(axis=2)
        refined = np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), s)
        refined = np.maximum(refined, top / (4 * kmax))  # keep it positive and sane
        candidate_k, candidate_error = _best_k(blocks, best_delta, refined, kmax, low, high, importance, group)
        better = candidate_error < error
        s[better], error[better] = refined[better], candidate_error[better]
        k = np.where(np.repeat(better, group, axis=1), candidate_k, k)
    return s, k
