"""Low-Power Blockwise Quantization (LPBQ) of one weight tensor, in pure numpy.

LPBQ gives each block of ``block_size`` input channels of one output channel a scale that is a
small integer multiple of one float scale per output channel::

    scale[c, b] = k[c, b] * s[c],     k in 1 .. 2**(decompressed_bw - bitwidth)
    w[c, i]    ~= scale[c, i // block_size] * q[c, i],   q in -2**(bitwidth-1) .. 2**(bitwidth-1)-1

so ``q * k`` is an integer on a per-channel grid of ``decompressed_bw`` bits: the layer runs on a
per-channel int8 kernel while storage stays near 4 bits per weight.

The arithmetic is bit-exact with aimet_onnx 2.42.0 (see docs/design.md §2): block deltas, the
per-channel scale and the integer block scales in float64 (``k`` rounds half to even), the
quantisation itself in float32 (``q`` rounds half away from zero after the ``+2**(bitwidth-1)``
shift). Worked example, Gemm transB=1 weight ``W[64, 256]``, block_size 64::

    enc = encode_lpbq(W, channel_axis=0, block_axis=1, block_size=64)
    enc.per_channel_scale.shape    # (64,)     float64
    enc.per_block_int_scale.shape  # (64, 4)   int32, 1..16
    enc.int_weight.shape           # (64, 256) int8, -8..7
    enc.qdq_weight.shape           # (64, 256) float32

This module must not import TVM: it is the reference the compiler passes are checked against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from lpbq_tvm.scale_search import magnitude_importance, search_scales

__all__ = [
    "LPBQConfig",
    "LPBQEncoding",
    "ENCODERS",
    "check_lpbq_weight",
    "encode_lpbq",
    "side_by_side",
    "weight_axes",
    "sqnr_db",
]

ENCODERS = ("aimet", "mse", "mse-act")
# Smallest block delta, as aimet_onnx: keeps all-zero blocks from producing a zero scale.
_MIN_DELTA = 1.1920928955078125e-07


@dataclass(frozen=True)
class LPBQConfig:
    """Settings of one LPBQ quantizer, validated on construction.

    ``block_grouping`` -1 lets all blocks of a channel share the float scale (AIMET's LPBQ);
    ``g > 0`` lets each run of ``g`` consecutive blocks share one float scale. ``encoder`` chooses
    how the scales are found (see :func:`encode_lpbq`); the stored format is the same.
    """

    bitwidth: int = 4
    decompressed_bw: int = 8
    block_size: int = 64
    block_grouping: int = -1
    encoder: str = "aimet"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            msg = f"unknown encoder {self.encoder!r}; known: {', '.join(ENCODERS)}"
            raise ValueError(msg)
        for name in ("bitwidth", "decompressed_bw", "block_size", "block_grouping"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                msg = f"{name} must be an integer, got {value!r}"
                raise ValueError(msg)
        if not 2 <= self.bitwidth <= 8:
            msg = f"unsupported bitwidth {self.bitwidth}: LPBQ supports 2..8 bit block codes"
            raise ValueError(msg)
        if not self.bitwidth <= self.decompressed_bw <= 16:
            msg = f"decompressed_bw {self.decompressed_bw} must lie in bitwidth ({self.bitwidth}) .. 16"
            raise ValueError(msg)
        if self.block_size <= 0:
            msg = f"block_size must be positive, got {self.block_size}"
            raise ValueError(msg)
        if self.block_grouping == 0 or self.block_grouping < -1:
            msg = f"block_grouping must be -1 (whole channel) or a positive count, got {self.block_grouping}"
            raise ValueError(msg)

    @classmethod
    def int8_per_channel(cls, input_channels: int) -> LPBQConfig:
        """Plain int8 per-channel quantization in LPBQ form: 8-bit codes, ``k`` = 1, one block of all
        ``input_channels`` (the int8 layers of a mixed-precision choice)."""
        return cls(8, 8, input_channels, -1, "aimet")

    @property
    def max_int_scale(self) -> int:
        """Largest integer block scale ``k``: ``2**(decompressed_bw - bitwidth)``."""
        return 1 << (self.decompressed_bw - self.bitwidth)

    def as_dict(self) -> dict[str, int | str]:
        return {
            "bitwidth": self.bitwidth,
            "decompressed_bw": self.decompressed_bw,
            "block_size": self.block_size,
            "block_grouping": self.block_grouping,
            "encoder": self.encoder,
        }


@dataclass(frozen=True, eq=False)
class LPBQEncoding:
    """The LPBQ encoding of one weight: its integer codes and float scales.

    ``float_scale`` is ``[C, n_groups]`` (one column for ``block_grouping=-1``, then
    ``per_channel_scale`` is its ``[C]`` view); ``per_block_int_scale`` is ``[C, nb]``;
    ``int_weight`` has the weight's own layout. ``lpbq_scale`` and ``qdq_weight`` are derived.
    """

    config: LPBQConfig
    channel_axis: int
    block_axis: int
    float_scale: np.ndarray
    per_block_int_scale: np.ndarray
    int_weight: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.int_weight.shape)

    @property
    def bitwidth(self) -> int:
        return self.config.bitwidth

    @property
    def decompressed_bw(self) -> int:
        return self.config.decompressed_bw

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def is_per_channel(self) -> bool:
        """Plain per-channel quantization: one block per channel and ``k`` fixed at 1 (bitwidth equals
        decompressed_bw), e.g. the int8 per-channel layers of a mixed-precision choice."""
        return self.num_blocks == 1 and self.bitwidth == self.decompressed_bw

    @property
    def block_grouping(self) -> int:
        return self.config.block_grouping

    @property
    def num_channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def num_blocks(self) -> int:
        return self.per_block_int_scale.shape[1]

    @property
    def per_channel_scale(self) -> np.ndarray:
        """``s[c]`` as float64 ``[C]``; only defined with one float scale per channel."""
        if self.float_scale.shape[1] != 1:
            msg = (
                f"block_grouping {self.block_grouping} gives {self.float_scale.shape[1]} float scales "
                "per channel; read float_scale [C, n_groups] instead"
            )
            raise ValueError(msg)
        return self.float_scale[:, 0]

    @cached_property
    def lpbq_scale(self) -> np.ndarray:
        """``k[c, b] * s[c, group(b)]`` in float64, ``[C, nb]``."""
        group = self.num_blocks // self.float_scale.shape[1]
        return self.per_block_int_scale * np.repeat(self.float_scale, group, axis=1)

    @property
    def qdq_weight(self) -> np.ndarray:
        """The dequantized weight ``float32(float32(scale) * q)`` in the weight's layout, computed on each
        access (not kept: it is as large as the fp32 weight)."""
        scale = self.lpbq_scale.astype(np.float32)[:, :, None]
        q = self.canonical_int_weight().reshape(self.num_channels, self.num_blocks, -1)
        canonical_shape = _to_canonical(self.int_weight, self.channel_axis, self.block_axis).shape
        return _from_canonical((q * scale).reshape(canonical_shape), self.channel_axis, self.block_axis)

    def expanded_int_weight(self) -> np.ndarray:
        """``q · k`` (int32, -128..112 for 4 -> 8 bits) in the weight's layout: the per-channel integer weight."""
        k = np.repeat(self.per_block_int_scale, self.block_size, axis=1)  # [C, I]
        k = k.reshape(k.shape + (1,) * (self.int_weight.ndim - 2))
        return self.int_weight.astype(np.int32) * _from_canonical(k, self.channel_axis, self.block_axis)

    def canonical_int_weight(self) -> np.ndarray:
        """``q`` as ``[C, I * R]``: channel axis first, then the block axis, then the rest."""
        return _to_canonical(self.int_weight, self.channel_axis, self.block_axis).reshape(self.num_channels, -1)


def side_by_side(encodings: Sequence[LPBQEncoding]) -> LPBQEncoding:
    """The encoding of the weights of ``encodings`` concatenated along their channel axis: each channel
    keeps its codes and scales, so it equals each layer's encoding on its own channels. They must share
    config, axes and every other dimension."""
    first = encodings[0]

    def layout(encoding: LPBQEncoding) -> tuple:
        others = np.delete(encoding.shape, first.channel_axis).tolist()
        return encoding.config, encoding.channel_axis, encoding.block_axis, others

    for other in encodings[1:]:
        if layout(other) != layout(first):
            msg = (
                f"encodings of shape {first.shape} ({first.config.as_dict()}) and {other.shape} "
                f"({other.config.as_dict()}) do not stand side by side along axis {first.channel_axis}"
            )
            raise ValueError(msg)
    return LPBQEncoding(
        config=first.config,
        channel_axis=first.channel_axis,
        block_axis=first.block_axis,
        float_scale=np.concatenate([e.float_scale for e in encodings]),
        per_block_int_scale=np.concatenate([e.per_block_int_scale for e in encodings]),
        int_weight=np.concatenate([e.int_weight for e in encodings], axis=first.channel_axis),
    )


def _normalize_axis(axis: int, ndim: int, what: str, shape: tuple[int, ...]) -> int:
    if not -ndim <= axis < ndim:
        msg = f"{what} {axis} is out of range for a weight of shape {shape}"
        raise ValueError(msg)
    return axis % ndim


def _to_canonical(array: np.ndarray, channel_axis: int, block_axis: int) -> np.ndarray:
    return np.moveaxis(array, (channel_axis, block_axis), (0, 1))


def _from_canonical(array: np.ndarray, channel_axis: int, block_axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, (0, 1), (channel_axis, block_axis)))


def check_lpbq_weight(
    shape: tuple[int, ...], channel_axis: int, block_axis: int, config: LPBQConfig, name: str | None = None
) -> tuple[int, int]:
    """Raise ``ValueError`` if a weight of ``shape`` cannot take ``config``; else the normalised axes.

    The message names ``name`` (node or tensor), the shape, the axis and the block size.
    """
    where = f"{name}: " if name else ""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        msg = f"{where}LPBQ needs a weight with at least 2 dimensions, got shape {shape}"
        raise ValueError(msg)
    channel_axis = _normalize_axis(channel_axis, len(shape), f"{where}channel axis", shape)
    block_axis = _normalize_axis(block_axis, len(shape), f"{where}block axis", shape)
    if channel_axis == block_axis:
        msg = f"{where}channel axis and block axis are both {channel_axis} for weight shape {shape}"
        raise ValueError(msg)
    length = shape[block_axis]
    if length % config.block_size:
        msg = (
            f"{where}weight shape {shape}: input-channel length {length} along block axis "
            f"{block_axis} is not divisible by block_size {config.block_size}"
        )
        raise ValueError(msg)
    num_blocks = length // config.block_size
    if config.block_grouping != -1 and num_blocks % config.block_grouping:
        msg = (
            f"{where}weight shape {shape}: block_grouping {config.block_grouping} does not divide the "
            f"{num_blocks} blocks of block_size {config.block_size} along block axis {block_axis}"
        )
        raise ValueError(msg)
    return channel_axis, block_axis


def _quantize_codes(blocks: np.ndarray, scale32: np.ndarray, bitwidth: int) -> np.ndarray:
    """Step 5 (float32): ``clip(round_half_away(w / scale + 2**(bw-1)), 0, 2**bw - 1) - 2**(bw-1)``.

    For t >= 0, round-half-away is floor(t) + (frac(t) >= 0.5), exact in float32; negative t clips
    to 0 either way. ``scale32`` broadcasts against ``blocks`` ``[C, nb, L]``.
    """
    negative_levels = 1 << (bitwidth - 1)
    shifted = blocks / scale32
    shifted += np.float32(negative_levels)
    rounded = np.floor(shifted)
    rounded += (shifted - rounded) >= np.float32(0.5)
    np.clip(rounded, 0, (1 << bitwidth) - 1, out=rounded)
    rounded -= np.float32(negative_levels)
    return rounded


def _group_error(blocks, float_scale, int_scale, bitwidth, group, importance) -> np.ndarray:
    """Exact (encoder-quantised) squared error per group ``[C, ng]``, optionally importance-weighted."""
    scale32 = (int_scale * np.repeat(float_scale, group, axis=1)).astype(np.float32)[..., None]
    diff = blocks - _quantize_codes(blocks, scale32, bitwidth) * scale32
    np.square(diff, out=diff)
    if importance is not None:
        diff *= importance
    per_block = diff.sum(axis=-1, dtype=np.float64)
    return per_block.reshape(per_block.shape[0], -1, group).sum(axis=2)


def _float32_weight(weight: np.ndarray, where: str) -> np.ndarray:
    """``weight`` as float32; ``ValueError`` for a non-float or non-finite weight."""
    if not np.issubdtype(weight.dtype, np.floating):
        msg = f"{where}LPBQ quantizes float weights, got dtype {weight.dtype} for shape {weight.shape}"
        raise ValueError(msg)
    weight = weight.astype(np.float32, copy=False)
    if not np.isfinite(weight).all():
        msg = f"{where}weight shape {weight.shape} contains non-finite values (NaN or Inf)"
        raise ValueError(msg)
    return weight


def _element_weights(importance, blocks_shape: tuple[int, ...], block_size: int, where: str) -> np.ndarray:
    """The ``mse-act`` error weight of every element of ``blocks`` ``[C, nb, B * R]``: its input
    channel's importance, repeated over the ``R`` kernel positions of that channel."""
    _, num_blocks, block_elements = blocks_shape
    importance = np.asarray(importance, dtype=np.float32)
    if importance.shape != (num_blocks * block_size,) or not np.isfinite(importance).all() or (importance < 0).any():
        msg = f"{where}importance must be {num_blocks * block_size} finite non-negative values"
        raise ValueError(msg)
    per_element = block_elements // block_size  # kernel positions per input channel
    return np.repeat(importance.reshape(num_blocks, block_size), per_element, axis=1)[None]


def _better_of_search(blocks, delta, float_scale, int_scale, config: LPBQConfig, group: int, weights):
    """Per group, the searched scales (:func:`lpbq_tvm.scale_search.search_scales`) where their error
    is smaller than AIMET's, else AIMET's own: never worse on any group."""
    searched_s, searched_k = search_scales(
        blocks, delta, float_scale, int_scale, config.bitwidth, config.max_int_scale, group, weights
    )
    better = _group_error(blocks, searched_s, searched_k, config.bitwidth, group, weights) < _group_error(
        blocks, float_scale, int_scale, config.bitwidth, group, weights
    )
    return np.where(better, searched_s, float_scale), np.where(np.repeat(better, group, axis=1), searched_k, int_scale)


def encode_lpbq(
    weight: np.ndarray,
    channel_axis: int,
    block_axis: int,
    *,
    bitwidth: int = 4,
    decompressed_bw: int = 8,
    block_size: int = 64,
    block_grouping: int = -1,
    encoder: str = "aimet",
    importance: np.ndarray | None = None,
    name: str | None = None,
) -> LPBQEncoding:
    """Encode ``weight`` with LPBQ; see the module docstring for the arithmetic.

    ``encoder``: ``"aimet"`` (default; bit-exact with aimet_onnx), ``"mse"`` (scales searched to
    minimise the squared weight error weighted by each weight's magnitude,
    :mod:`lpbq_tvm.scale_search`; never worse than ``"aimet"`` on that error in any group) or
    ``"mse-act"`` (the squared error weighted per input channel by ``importance``, e.g. the mean
    square of the layer's input, length = the block axis). The output format is the same for all
    three. ``name`` (the ONNX node or tensor) only serves error messages.
    Raises ``ValueError`` naming the weight shape, the axes and the block size when the weight
    cannot take LPBQ.
    """
    config = LPBQConfig(bitwidth, decompressed_bw, block_size, block_grouping, encoder)
    weight = np.asarray(weight)
    channel_axis, block_axis = check_lpbq_weight(weight.shape, channel_axis, block_axis, config, name)
    where = f"{name}: " if name else ""
    if (encoder == "mse-act") != (importance is not None):
        msg = f"{where}encoder 'mse-act' needs an importance per input channel, and only it takes one"
        raise ValueError(msg)
    weight = _float32_weight(weight, where)

    canonical = _to_canonical(weight, channel_axis, block_axis)
    num_channels = weight.shape[channel_axis]
    num_blocks = weight.shape[block_axis] // block_size
    group = num_blocks if block_grouping == -1 else block_grouping
    blocks = canonical.reshape(num_channels, num_blocks, -1)  # [C, nb, B * R]

    # Steps 1-4 (float64): block deltas, shared float scale, integer block scales.
    positive_levels = (1 << (bitwidth - 1)) - 1
    negative_levels = 1 << (bitwidth - 1)
    block_min = np.minimum(blocks.min(axis=2), 0).astype(np.float64)
    block_max = np.maximum(blocks.max(axis=2), 0).astype(np.float64)
    delta = np.maximum(np.maximum(block_max / positive_levels, -block_min / negative_levels), _MIN_DELTA)
    grouped = delta.reshape(num_channels, num_blocks // group, group)
    float_scale = grouped.max(axis=2) / config.max_int_scale  # [C, n_groups]
    int_scale = np.clip(np.round(grouped / float_scale[:, :, None]), 1, config.max_int_scale)
    int_scale = int_scale.reshape(num_channels, num_blocks)

    if encoder != "aimet":
        blocks = np.ascontiguousarray(blocks)  # the search streams over it many times
        if importance is None:
            weights = magnitude_importance(blocks)
        else:
            weights = _element_weights(importance, blocks.shape, block_size, where)
        float_scale, int_scale = _better_of_search(blocks, delta, float_scale, int_scale, config, group, weights)

    scale32 = (int_scale * np.repeat(float_scale, group, axis=1)).astype(np.float32)[..., None]
    int_weight = _quantize_codes(blocks, scale32, bitwidth).astype(np.int8).reshape(canonical.shape)
    return LPBQEncoding(
        config=config,
        channel_axis=channel_axis,
        block_axis=block_axis,
        float_scale=float_scale,
        per_block_int_scale=int_scale.astype(np.int32),
        int_weight=_from_canonical(int_weight, channel_axis, block_axis),
    )


def weight_axes(op_type: str, weight_ndim: int, attributes: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """``(channel_axis, block_axis)`` of the weight of an ONNX ``op_type`` (docs/design.md §2).

    Gemm: ``transB=1`` -> (0, 1), ``transB=0`` -> (1, 0). MatMul with a constant second input
    ``[.., in, out]`` -> (ndim-1, ndim-2). Conv ``[out, in/groups, *kernel]`` -> (0, 1) for any
    ``group`` (a depthwise conv has in/groups == 1 and so cannot be blocked).
    """
    attributes = attributes or {}
    if op_type == "Gemm":
        if weight_ndim != 2:
            msg = f"Gemm weight must be 2-D, got {weight_ndim}-D"
            raise ValueError(msg)
        return (0, 1) if int(attributes.get("transB", 0)) else (1, 0)
    if op_type == "MatMul":
        if weight_ndim < 2:
            msg = f"MatMul weight must be at least 2-D for LPBQ, got {weight_ndim}-D"
            raise ValueError(msg)
        return weight_ndim - 1, weight_ndim - 2
    if op_type == "Conv":
        if weight_ndim < 3:
            msg = f"Conv weight must be at least 3-D, got {weight_ndim}-D"
            raise ValueError(msg)
        return 0, 1
    msg = f"no LPBQ weight layout for op type {op_type!r}; known: Gemm, MatMul, Conv"
    raise ValueError(msg)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB.

    Infinite when the approximation is exact.
    """
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum(np.square(reference - np.asarray(approximation, dtype=np.float64))))
    signal = float(np.sum(np.square(reference)))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
