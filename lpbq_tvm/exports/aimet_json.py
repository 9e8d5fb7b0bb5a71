"""AIMET encodings files, versions 1.0.0 (default) and 2.0.0, as aimet_onnx writes them.

1.0.0::

    {"version": "1.0.0",
     "activation_encodings": [{"name", "dtype": "INT", "enc_type": "PER_TENSOR", "bw", "is_sym": false,
                               "scale": [s], "offset": [o]}],          # QNN-style offset <= 0
     "param_encodings": [LPBQ entries (enc_type "LPBQ") | per-channel int8 entries (enc_type "PER_CHANNEL")],
     "excluded_layers": [node names left in float],
     "quantizer_args": {...}}

Activation entries are per tensor, one for every calibrated activation (each float graph input
and node output, named as in the ONNX model), as AIMET's QDQ export quantizes them all.

2.0.0: ``{"version": "2.0.0", "encodings": [...]}`` — one list; activation entries carry
``output_dtype``, ``y_scale`` and ``y_zero_point`` (omitted when zero); LPBQ entries
``per_channel_float_scale`` / ``per_block_int_scale`` shaped like the weight, ``axis`` (block
axis) and ``block_size``; per-channel entries ``y_scale`` and ``axis``. aimet_onnx refuses 2.0.0
for LPBQ with ``decompressed_bw != 2 * bitwidth``, and so does this writer.

A layer that cannot take LPBQ keeps 8-bit symmetric per-channel weights (``scale = max|w| / 127``
per output channel, offset -128), as AIMET's fallback does; an all-zero channel gets the minimum
scale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from lpbq_tvm.calibration import ActivationEncoding
from lpbq_tvm.encoder import LPBQEncoding

__all__ = [
    "VERSIONS",
    "activation_entry",
    "encodings_file",
    "param_entry",
    "per_channel_entry",
    "per_channel_int8_entry",
    "read_encodings",
    "read_encodings_file",
]

VERSIONS = ("1.0.0", "2.0.0")
_MIN_SCALE = 1.1920928955078125e-07 / 127  # the minimum delta of the LPBQ encoder, on the int8 grid


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown AIMET encoding version {version!r}; known: {', '.join(VERSIONS)}")


def param_entry(name: str, encoding: LPBQEncoding, version: str = "1.0.0") -> dict[str, Any]:
    """The AIMET param-encoding entry of an encoded weight, as aimet_onnx writes it.

    1.0.0: per-channel ``scale`` and ``per_block_int_scale`` flattened out-channel-major.
    2.0.0: arrays shaped like the weight (C at the channel axis, nb at the block axis, 1
    elsewhere); refused, as AIMET does, when ``decompressed_bw != 2 * bitwidth``. An int8
    per-channel layer (a mixed-precision choice) is a ``PER_CHANNEL`` entry.
    """
    _check_version(version)
    if encoding.is_per_channel:
        return per_channel_entry(name, encoding.per_channel_scale, encoding.channel_axis, encoding.bitwidth, version)
    k = encoding.per_block_int_scale
    if version == "1.0.0":
        return {
            "name": name,
            "dtype": "INT",
            "enc_type": "LPBQ",
            "compressed_bw": encoding.bitwidth,
            "bw": encoding.decompressed_bw,
            "is_sym": True,
            "scale": encoding.float_scale.reshape(-1).tolist(),
            "per_block_int_scale": k.reshape(-1).tolist(),
            "offset": [-(1 << (encoding.decompressed_bw - 1))] * encoding.float_scale.size,
            "block_size": encoding.block_size,
        }
    if encoding.decompressed_bw != 2 * encoding.bitwidth:
        msg = (
            f"{name}: LPBQ encoding with decompressed_bw {encoding.decompressed_bw} != "
            f"2 * bitwidth {encoding.bitwidth} cannot be exported to the 2.0.0 encoding format "
            "(aimet_onnx refuses it too); export version 1.0.0 instead"
        )
        raise ValueError(msg)
    return {
        "name": name,
        "output_dtype": f"int{encoding.bitwidth}",
        "per_channel_float_scale": _weight_shaped(encoding, encoding.float_scale).tolist(),
        "per_block_int_scale": _weight_shaped(encoding, k).tolist(),
        "axis": encoding.block_axis,
        "block_size": encoding.block_size,
    }


def _weight_shaped(encoding: LPBQEncoding, per_channel_block: np.ndarray) -> np.ndarray:
    """Place a ``[C, n]`` array at (channel_axis, block_axis) with 1 on every other axis."""
    ndim = len(encoding.shape)
    expanded = per_channel_block.reshape(per_channel_block.shape + (1,) * (ndim - 2))
    return np.moveaxis(expanded, (0, 1), (encoding.channel_axis, encoding.block_axis))


def per_channel_entry(name: str, scale: np.ndarray, channel_axis: int, bitwidth: int, version: str) -> dict[str, Any]:
    """AIMET's symmetric per-channel param entry (aimet_onnx ``AffineEncoding._to_1_0_0`` / ``_to_2_0_0``)."""
    _check_version(version)
    if version == "1.0.0":
        return {
            "name": name,
            "dtype": "INT",
            "enc_type": "PER_CHANNEL",
            "bw": bitwidth,
            "is_sym": True,
            "scale": np.asarray(scale).tolist(),
            "offset": [-(1 << (bitwidth - 1))] * np.size(scale),
        }
    return {"name": name, "output_dtype": f"int{bitwidth}", "y_scale": np.asarray(scale).tolist(), "axis": channel_axis}


def per_channel_int8_entry(name: str, weight: np.ndarray, channel_axis: int, version: str = "1.0.0") -> dict[str, Any]:
    """Symmetric int8 per-channel encoding of a float weight (AIMET's non-LPBQ weight quantizer)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), channel_axis, 0).reshape(weight.shape[channel_axis], -1)
    scale = np.maximum(moved.max(axis=1) / 127.0, _MIN_SCALE)
    return per_channel_entry(name, scale, channel_axis, 8, version)


def activation_entry(name: str, encoding: ActivationEncoding, version: str = "1.0.0") -> dict[str, Any]:
    """The AIMET activation-encoding entry (1.0.0: lists of one; 2.0.0: y_scale / y_zero_point)."""
    _check_version(version)
    if version == "1.0.0":
        return {
            "name": name,
            "dtype": "INT",
            "enc_type": "PER_TENSOR",
            "bw": encoding.bitwidth,
            "is_sym": False,
            "scale": [encoding.scale],
            "offset": [encoding.offset],
        }
    entry = {"name": name, "output_dtype": encoding.dtype, "y_scale": encoding.scale}
    if encoding.zero_point:
        entry["y_zero_point"] = encoding.zero_point
    return entry


def encodings_file(
    lpbq: Mapping[str, LPBQEncoding],
    fallback: Mapping[str, tuple[np.ndarray, int]],
    activations: Mapping[str, ActivationEncoding],
    excluded_layers: Sequence[str],
    version: str = "1.0.0",
) -> dict[str, Any]:
    """The whole file: LPBQ weights, per-channel int8 fallbacks ``{name: (weight, channel_axis)}``, activations."""
    _check_version(version)
    params = [param_entry(name, encoding, version) for name, encoding in lpbq.items()]
    params += [per_channel_int8_entry(name, weight, axis, version) for name, (weight, axis) in fallback.items()]
    acts = [activation_entry(name, encoding, version) for name, encoding in activations.items()]
    if version == "2.0.0":
        return {"version": "2.0.0", "encodings": acts + params}
    bitwidths = sorted({encoding.bitwidth for encoding in activations.values()})
    return {
        "version": "1.0.0",
        "activation_encodings": acts,
        "param_encodings": params,
        "excluded_layers": list(excluded_layers),
        "quantizer_args": {
            "activation_bitwidth": bitwidths[0] if len(bitwidths) == 1 else bitwidths,
            "dtype": "int",
            "is_symmetric": True,
            "per_channel_quantization": True,
            "quant_scheme": "post_training_tf",
        },
    }


def read_encodings(content: Mapping[str, Any], where: str = "AIMET encodings") -> dict[str, dict[str, Any]]:
    """Entries of AIMET encodings content (either version) by tensor name; ValueError if malformed."""
    version = content.get("version")
    if version == "1.0.0":
        entries = content["activation_encodings"] + content["param_encodings"]
    elif version == "2.0.0":
        entries = content["encodings"]
    else:
        raise ValueError(f"{where}: unknown AIMET encodings version {version!r}")
    return {entry["name"]: entry for entry in entries}


def read_encodings_file(path: str | PathLike) -> dict[str, dict[str, Any]]:
    """Entries of an AIMET encodings file by tensor name (either version); ValueError if malformed."""
    return read_encodings(json.loads(Path(path).read_text()), str(path))
