"""EncodeLPBQ: run the numpy LPBQ encoder on every weight that AnnotateLPBQ selected.

Match: functions with an ``"lpbq.weights"`` attribute (written by AnnotateLPBQ).

Layers annotated with ``encoder="mse-act"`` read their input importance from
``"lpbq.input_importance"`` (:func:`attach_input_importance`).

Rewrite: nothing in the body. The function gets ``"lpbq.encodings"``: weight key -> ``s``
(float64 ``[C, n_groups]``), ``k`` (int32 ``[C, nb]``), ``q`` (int8, the weight's layout) and
``sqnr_db``. Weight values come from the function's ``"params"`` attribute (``from_onnx(...,
keep_params_in_input=True)``) or from the annotated constant. :func:`read_encodings` turns the
attribute back into :class:`lpbq_tvm.encoder.LPBQEncoding` objects, bit-identical to what the
encoder returned.

Run it after AnnotateLPBQ and before LowerLPBQ.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.attrs import ENCODINGS_ATTR, IMPORTANCE_ATTR, WEIGHTS_ATTR, function_attr
from lpbq_tvm.encoder import LPBQConfig, LPBQEncoding, encode_lpbq, sqnr_db
from lpbq_tvm.passes._layers import map_relax_functions, weight_value

__all__ = ["EncodeLPBQ", "attach_input_importance", "read_encodings"]


def attach_input_importance(mod, importance: dict, function: str = "main"):
    """Record, per weight key, the mean square of the layer's input per input channel (for ``mse-act``)."""
    mod = mod.clone()
    gvar = mod.get_global_var(function)
    values = {key: tvm.runtime.tensor(np.asarray(value, dtype=np.float32)) for key, value in importance.items()}
    mod.update_func(gvar, mod[gvar].with_attr(IMPORTANCE_ATTR, values))
    return mod


def _config(annotation) -> LPBQConfig:
    return LPBQConfig(
        int(annotation["bitwidth"]),
        int(annotation["decompressed_bw"]),
        int(annotation["block_size"]),
        int(annotation["block_grouping"]),
        str(annotation.get("encoder", "aimet")),
    )


def read_encodings(func: relax.Function) -> dict[str, LPBQEncoding]:
    """The LPBQ encodings EncodeLPBQ attached to ``func``, by weight key."""
    annotations = function_attr(func, WEIGHTS_ATTR)
    encodings = {}
    for key, stored in function_attr(func, ENCODINGS_ATTR).items():
        annotation = annotations[key]
        encodings[key] = LPBQEncoding(
            config=_config(annotation),
            channel_axis=int(annotation["channel_axis"]),
            block_axis=int(annotation["block_axis"]),
            float_scale=stored["s"].numpy(),
            per_block_int_scale=stored["k"].numpy(),
            int_weight=stored["q"].numpy(),
        )
    return encodings


@tvm.transform.module_pass(opt_level=0, name="EncodeLPBQ")
class EncodeLPBQ:
    """Attach the LPBQ encoding of every annotated weight; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, self._encode)

    @staticmethod
    def _encode(func: relax.Function) -> relax.Function:
        annotations = function_attr(func, WEIGHTS_ATTR)
        if not annotations:
            return func
        importance = function_attr(func, IMPORTANCE_ATTR)
        encodings = {}
        for key, annotation in annotations.items():
            weight = weight_value(key, annotation, func)
            config = _config(annotation)
            if config.encoder == "mse-act" and key not in importance:
                msg = (
                    f"{annotation['node']}: encoder mse-act needs the input importance of this layer "
                    "(calibration data: sim.compute_encodings(callback, args), or attach_input_importance)"
                )
                raise ValueError(msg)
            encoding = encode_lpbq(
                weight,
                int(annotation["channel_axis"]),
                int(annotation["block_axis"]),
                **config.as_dict(),
                importance=importance[key].numpy() if config.encoder == "mse-act" else None,
                name=str(annotation["node"]),
            )
            encodings[key] = {
                "s": tvm.runtime.tensor(encoding.float_scale),
                "k": tvm.runtime.tensor(encoding.per_block_int_scale),
                "q": tvm.runtime.tensor(np.ascontiguousarray(encoding.int_weight)),
                "sqnr_db": sqnr_db(weight, encoding.qdq_weight),
            }
        return func.with_attr(ENCODINGS_ATTR, encodings)
