"""Private to the LPBQ passes: how a Gemm / MatMul / Conv layer with a constant weight looks in Relax.

``from_onnx`` imports Gemm transB=1 as ``matmul(x, permute_dims(w))``, Gemm transB=0 and MatMul
as ``matmul(x, w)``, Conv as ``nn.conv1d`` / ``nn.conv2d`` (after ChannelsLast, an NHWC conv2d of
``permute_dims(w)`` in HWIO); a bias follows as ``add(layer, b)``.
The weight of a candidate is a function parameter or a constant. The function attributes that
carry LPBQ state between passes are named in :mod:`lpbq_tvm.attrs`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from lpbq_tvm.attrs import PARAMS_ATTR, num_inputs


class LayerPatterns:
    """Sub-patterns are attributes so that a rewriter can read ``matchings[self.weight]``.

    With ``merged=True`` a dense layer's weight may also be a concatenation of weights along its
    channel axis (MergeSiblingLayers' layers); ``matchings[self.weight]`` is then the ``concat``."""

    def __init__(self, merged: bool = False) -> None:
        self.x = wildcard()
        self.weight = (is_op("relax.concat")(wildcard()) | wildcard()) if merged else wildcard()
        self.bias = wildcard()
        self.transpose = is_op("relax.permute_dims")(self.weight)
        self.dense_transposed = is_op("relax.matmul")(self.x, self.transpose)
        self.dense = is_op("relax.matmul")(self.x, self.weight)
        self.conv = is_op("relax.nn.conv2d")(self.x, self.weight) | is_op("relax.nn.conv1d")(self.x, self.weight)
        self.kernel_transpose = is_op("relax.permute_dims")(self.weight)  # OIHW -> HWIO, by ChannelsLast
        self.conv_channels_last = is_op("relax.nn.conv2d")(self.x, self.kernel_transpose)
        self.layer = self.dense_transposed | self.dense | self.conv | self.conv_channels_last
        self.with_bias = is_op("relax.add")(self.layer, self.bias)


@dataclass(frozen=True)
class Candidate:
    """A matched layer: ``call`` is the matmul / conv call, ``weight`` its parameter or constant."""

    kind: str  # "dense" or "conv"
    op_type: str  # the ONNX op type it most likely came from (Gemm for a transposed weight)
    call: relax.Call
    x: relax.Expr
    weight: relax.Expr
    channel_axis: int
    block_axis: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.ty.shape)

    @property
    def channels_last(self) -> bool:
        """An NHWC conv (after ChannelsLast): channels on the last axis of its input and output."""
        return self.kind == "conv" and str(self.call.attrs.data_layout) == "NHWC"


def is_weight(expr: relax.Expr, func: relax.Function) -> bool:
    """A function parameter or a constant; or a concatenation of them (:func:`weight_parts`)."""
    if isinstance(expr, tvm.ir.GenericConst):
        return True
    if (parts := weight_parts(expr)) is not None:
        return all(is_weight(part, func) for part in parts)
    return isinstance(expr, relax.Var) and any(expr.same_as(param) for param in func.params)


def weight_parts(weight: relax.Expr) -> list[relax.Expr] | None:
    """The weights a ``concat`` joins (MergeSiblingLayers' weight of merged layers), or None."""
    if isinstance(weight, relax.Call) and weight.op.same_as(tvm.ir.Op.get("relax.concat")):
        tuple_ = weight.args[0]
        return list(tuple_.fields) if isinstance(tuple_, relax.Tuple) else None
    return None


def match_candidate(patterns: LayerPatterns, matchings: dict, func: relax.Function) -> Candidate | None:
    """The candidate layer of a match of ``patterns.layer``, or None when the weight is computed."""
    weight = matchings[patterns.weight]
    if not is_weight(weight, func):
        return None
    call = matchings[patterns.layer]
    ndim = len(weight.ty.shape)
    if call.op.name == "relax.matmul":
        if patterns.dense_transposed in matchings:
            axes = matchings[patterns.transpose].attrs.axes
            if ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
                return None
            candidate = Candidate("dense", "Gemm", call, matchings[patterns.x], weight, 0, 1)
        else:
            candidate = Candidate("dense", "MatMul", call, matchings[patterns.x], weight, ndim - 1, ndim - 2)
        if weight_parts(weight) is not None and int(weight.attrs.axis) % ndim != candidate.channel_axis:
            return None  # weights joined along their depth: not layers side by side
        return candidate
    if weight_parts(weight) is not None:
        return None
    if patterns.conv_channels_last in matchings:
        axes = matchings[patterns.kernel_transpose].attrs.axes
        if str(call.attrs.kernel_layout) != "HWIO" or [int(a) for a in axes or ()] != [2, 3, 1, 0]:
            return None
    return Candidate("conv", "Conv", call, matchings[patterns.x], weight, 0, 1)


def weight_key(weight: relax.Expr, annotations: dict[str, Any]) -> str | None:
    """The key of ``weight`` in an annotation map: its parameter name, or the constant's entry (for a
    concatenation of weights, :func:`weight_keys`)."""
    if isinstance(weight, relax.Var):
        return weight.name
    for key, entry in annotations.items():
        if "constant" in entry and entry["constant"].same_as(weight):
            return key
    return None


def weight_keys(weight: relax.Expr, annotations: dict[str, Any]) -> list[str] | None:
    """The keys of the weights ``weight`` joins (one for a parameter or constant), or None if one has none."""
    keys = [weight_key(part, annotations) for part in weight_parts(weight) or [weight]]
    return None if None in keys else keys


def weight_value(key: str, annotation: dict[str, Any], func: relax.Function) -> np.ndarray:
    """The value of an annotated weight: its constant, or its entry in the ``params`` attribute."""
    if "constant" in annotation:
        return annotation["constant"].value.numpy()
    num_input = num_inputs(func)
    names = [param.name for param in func.params]
    values = func.attrs[PARAMS_ATTR] if func.attrs and PARAMS_ATTR in func.attrs else None
    if values is None or key not in names[num_input:]:
        msg = (
            f"weight {key!r} is a function parameter without a value: keep the {PARAMS_ATTR!r} attribute "
            "(from_onnx(..., keep_params_in_input=True)) or bind it as a constant"
        )
        raise ValueError(msg)
    return values[names.index(key) - num_input].numpy()


def read_counts(func: relax.Function) -> Counter:
    """How many times ``func``'s body reads each variable."""
    reads: Counter = Counter()
    relax.analysis.post_order_visit(func.body, lambda expr: reads.update([expr] if isinstance(expr, relax.Var) else []))
    return reads


def map_relax_functions(mod: tvm.IRModule, transform) -> tvm.IRModule:
    """Apply ``transform(func) -> func`` to every Relax function; ``mod`` itself when none changes."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new_func = transform(func)
            if not new_func.same_as(func):
                updates[gvar] = new_func
    if not updates:
        return mod
    mod = mod.clone()
    for gvar, func in updates.items():
        mod.update_func(gvar, func)
    return mod
