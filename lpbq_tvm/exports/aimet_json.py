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
from lpbq_tvm.encoder import LPBQEncoding, per_channel_entry

__all__ = ["VERSIONS", "per_channel_int8_entry", "encodings_file", "read_encodings_file"]

VERSIONS = ("1.0.0", "2.0.0")
_MIN_SCALE = 1.1920928955078125e-07 / 127  # the minimum delta of the LPBQ encoder, on the int8 grid


def per_channel_int8_entry(name: str, weight: np.ndarray, channel_axis: int, version: str = "1.0.0") -> dict[str, Any]:
    """Symmetric int8 per-channel encoding of a float weight (AIMET's non-LPBQ weight quantizer)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), channel_axis, 0).reshape(weight.shape[channel_axis], -1)
    scale = np.maximum(moved.max(axis=1) / 127.0, _MIN_SCALE)
    return per_channel_entry(name, scale, channel_axis, 8, version)


def encodings_file(
    lpbq: Mapping[str, LPBQEncoding],
    fallback: Mapping[str, tuple[np.ndarray, int]],
    activations: Mapping[str, ActivationEncoding],
    excluded_layers: Sequence[str],
    version: str = "1.0.0",
) -> dict[str, Any]:
    """The whole file: LPBQ weights, per-channel int8 fallbacks ``{name: (weight, channel_axis)}``, activations."""
    if version not in VERSIONS:
        raise ValueError(f"unknown AIMET encoding version {version!r}; known: {', '.join(VERSIONS)}")
    params = [encoding.aimet_entry(name, version) for name, encoding in lpbq.items()]
    params += [per_channel_int8_entry(name, weight, axis, version) for name, (weight, axis) in fallback.items()]
    acts = [encoding.aimet_entry(name, version) for name, encoding in activations.items()]
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


def read_encodings_file(path: str | PathLike) -> dict[str, dict[str, Any]]:
    """Entries of an AIMET encodings file by tensor name (either version); ValueError if malformed."""
    data = json.loads(Path(path).read_text())
    version = data.get("version")
    if version == "1.0.0":
        entries = data["activation_encodings"] + data["param_encodings"]
    elif version == "2.0.0":
        entries = data["encodings"]
    else:
        raise ValueError(f"{path}: unknown AIMET encodings version {version!r}")
    return {entry["name"]: entry for entry in entries}
