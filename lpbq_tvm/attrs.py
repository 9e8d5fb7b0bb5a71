"""The function attributes that carry LPBQ state through a Relax module: names, writers and readers.

Passes keep their state on the Relax function they transform rather than in side tables, so a
module can be printed, saved with ``tvm.ir.save_json`` and resumed between any two steps. Each
attribute is a map keyed by *weight key*: a parameter name, or ``constant<i>`` for a weight that is
a Relax constant (the entry then holds the constant).

===========================  ===============================  ===============================================
attribute                    written by                       value per weight key
===========================  ===============================  ===============================================
``lpbq.onnx_nodes``          :mod:`lpbq_tvm.frontend`         ``node``, ``op_type``, ``has_bias`` of its ONNX node
``lpbq.weights``             ``AnnotateLPBQ``                 node, op type, channel / block axis, the LPBQ config;
                             ``set_activation_bitwidth``      ``activation_bitwidth`` / ``output_activation_bitwidth``:
                                                              the widths of its input / output tensor, if not the mode's
``lpbq.skipped``             ``AnnotateLPBQ``                 node, op type and the reason it stays fp32
``lpbq.input_importance``    ``attach_input_importance``      float32 ``[input channels]`` (encoder ``mse-act``)
``lpbq.encodings``           ``EncodeLPBQ``                   ``s``, ``k``, ``q`` arrays and ``sqnr_db``
``lpbq.activation_ranges``   ``attach_activation_ranges``     ``input`` / ``output`` / ``pre_bias``: ``[min, max]``
``lpbq.lowered``             ``LowerLPBQ``                    node, op type, mode, packed parameter names
===========================  ===============================  ===============================================

``LowerLPBQ`` drops ``lpbq.encodings``: the packed parameters are then the only copy of a weight.
Two attributes come from TVM's ONNX importer: ``num_input`` (how many leading parameters are the
model's inputs) and ``params`` (the values of the parameters after them).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ACTIVATION_BITWIDTH",
    "OUTPUT_ACTIVATION_BITWIDTH",
    "ACTIVATION_RANGES_ATTR",
    "ENCODINGS_ATTR",
    "IMPORTANCE_ATTR",
    "LOWERED_ATTR",
    "ONNX_NODES_ATTR",
    "NUM_INPUT_ATTR",
    "PARAMS_ATTR",
    "SKIPPED_ATTR",
    "WEIGHTS_ATTR",
    "function_attr",
    "num_inputs",
]

ONNX_NODES_ATTR = "lpbq.onnx_nodes"
WEIGHTS_ATTR = "lpbq.weights"
SKIPPED_ATTR = "lpbq.skipped"
IMPORTANCE_ATTR = "lpbq.input_importance"
ENCODINGS_ATTR = "lpbq.encodings"
ACTIVATION_RANGES_ATTR = "lpbq.activation_ranges"
LOWERED_ATTR = "lpbq.lowered"
PARAMS_ATTR = "params"
NUM_INPUT_ATTR = "num_input"
# Keys of a ``lpbq.weights`` entry: the width (8 or 16) of the layer's input tensor, and of its output
# tensor (the input of such a layer), where they are not the mode's.
ACTIVATION_BITWIDTH = "activation_bitwidth"
OUTPUT_ACTIVATION_BITWIDTH = "output_activation_bitwidth"


def function_attr(func, name: str) -> dict[str, Any]:
    """A map-valued function attribute as a plain dict (empty when absent)."""
    if func.attrs is None or name not in func.attrs:
        return {}
    return {str(key): value for key, value in func.attrs[name].items()}


def num_inputs(func) -> int:
    """How many leading parameters of ``func`` are model inputs: its ``num_input`` attribute, else all."""
    if func.attrs is not None and NUM_INPUT_ATTR in func.attrs:
        return int(func.attrs[NUM_INPUT_ATTR])
    return len(func.params)
