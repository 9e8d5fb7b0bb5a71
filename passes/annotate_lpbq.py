"""AnnotateLPBQ: choose which Gemm / MatMul / Conv weights take LPBQ, and record why others do not.

Match: ``relax.matmul(x, permute_dims(w))`` (Gemm transB=1), ``relax.matmul(x, w)`` (Gemm
transB=0, MatMul; 2-D weight, activations of any rank), ``relax.nn.conv1d`` / ``relax.nn.conv2d``
(any stride, padding, dilation, groups) whose weight ``w`` is a function parameter or a constant.

Rewrite: nothing in the body. Each function gets the attribute ``"lpbq.weights"`` (weight key ->
node, op type, channel / block axis and the LPBQ config) and ``"lpbq.skipped"`` (weight key ->
node, op type and the reason: excluded by the user, op type not selected, not divisible by the
block size, depthwise, unsupported layout, ...). Weight keys are parameter names, or
``constant<i>`` for constants (the entry then holds the constant). Node names and ONNX op types
come from the ``"lpbq.onnx_nodes"`` attribute that :mod:`lpbq_tvm.frontend` writes, and where it is
present only its weights are candidates (a layer inside an ``If`` branch, which TVM imports inline,
is not one; the frontend lists those as staying fp32); without it the parameter name and the Relax
form (permuted weight -> Gemm) stand in.

Applying the pass again merges: a later application wins for the layers whose op type it
selects and leaves the others as they were. With ``strict=True`` a selected layer that cannot
take LPBQ raises ``ValueError`` naming node, shape, axis and block size.

Run it on the imported fp32 module, before EncodeLPBQ and LowerLPBQ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tvm
from tvm import relax
from tvm.relax.dpl import rewrite_call

from lpbq_tvm.attrs import ONNX_NODES_ATTR, SKIPPED_ATTR, WEIGHTS_ATTR, function_attr
from lpbq_tvm.encoder import LPBQConfig, check_lpbq_weight
from lpbq_tvm.passes._layers import Candidate, LayerPatterns, map_relax_functions, match_candidate, weight_key

__all__ = ["AnnotateLPBQ", "SUPPORTED_OP_TYPES"]

SUPPORTED_OP_TYPES = ("Gemm", "MatMul", "Conv")


def _unsupported_reason(candidate: Candidate, config: LPBQConfig) -> str | None:
    """Why this layer cannot take LPBQ with ``config`` (None when it can); the caller names the node."""
    shape = candidate.weight_shape
    if candidate.weight.ty.dtype != "float32":
        return f"weight dtype {candidate.weight.ty.dtype} is not float32"
    if candidate.kind == "dense" and len(shape) != 2:
        return f"MatMul weight of shape {shape} is batched; LPBQ kernels take 2-D weights"
    if candidate.kind == "conv":
        attrs = candidate.call.attrs
        if attrs.data_layout not in ("NCW", "NCHW") or attrs.kernel_layout not in ("OIW", "OIHW"):
            return f"conv layout {attrs.data_layout}/{attrs.kernel_layout} is not NCHW/OIHW or NCW/OIW"
        if int(attrs.groups) > 1 and shape[1] == 1:
            return (
                f"depthwise conv (weight shape {shape}, groups {int(attrs.groups)}) has one input "
                "channel per group, so there are no input-channel blocks to quantize"
            )
    try:
        check_lpbq_weight(shape, candidate.channel_axis, candidate.block_axis, config)
    except ValueError as error:
        return str(error)
    return None


@tvm.transform.module_pass(opt_level=0, name="AnnotateLPBQ")
class AnnotateLPBQ:
    """Annotate the weights to quantize with LPBQ; see the module docstring."""

    def __init__(
        self,
        config: LPBQConfig | None = None,
        op_types: Iterable[str] = SUPPORTED_OP_TYPES,
        excluded_nodes: Iterable[str] = (),
        strict: bool = False,
    ) -> None:
        self.config = config or LPBQConfig()
        self.op_types = tuple(op_types)
        unknown = sorted(set(self.op_types) - set(SUPPORTED_OP_TYPES))
        if unknown:
            msg = f"unknown op type(s) {', '.join(unknown)}; LPBQ applies to {', '.join(SUPPORTED_OP_TYPES)}"
            raise ValueError(msg)
        self.excluded_nodes = frozenset(excluded_nodes)
        self.strict = strict
        self.patterns = LayerPatterns()

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, self._annotate)

    def _candidates(self, func: relax.Function) -> list[Candidate]:
        found = []

        def record(call: relax.Call, matchings: dict) -> relax.Call:
            candidate = match_candidate(self.patterns, matchings, func)
            if candidate is not None and not any(c.call.same_as(candidate.call) for c in found):
                found.append(candidate)
            return call

        rewrite_call(self.patterns.layer, record, func)
        return found

    def _annotate(self, func: relax.Function) -> relax.Function:
        candidates = self._candidates(func)
        if not candidates:
            return func
        onnx_nodes = function_attr(func, ONNX_NODES_ATTR)
        from_node_table = func.attrs is not None and ONNX_NODES_ATTR in func.attrs
        weights = function_attr(func, WEIGHTS_ATTR)
        skipped = function_attr(func, SKIPPED_ATTR)
        for candidate in candidates:
            key = weight_key(candidate.weight, {**weights, **skipped})
            if key is None:
                key = f"constant{sum(k.startswith('constant') for k in {**weights, **skipped})}"
            if from_node_table and key not in onnx_nodes:
                continue  # not a layer of the ONNX graph's own (e.g. one inside an If branch, imported inline)
            origin = onnx_nodes.get(key, {})
            node = str(origin.get("node", key))
            op_type = str(origin.get("op_type", candidate.op_type))
            entry: dict[str, Any] = {**origin, "node": node, "op_type": op_type}
            if isinstance(candidate.weight, tvm.ir.GenericConst):
                entry["constant"] = candidate.weight
            reason = self._skip_reason(candidate, node, op_type, key in weights or key in skipped)
            if reason is None:
                skipped.pop(key, None)
                weights[key] = {
                    **entry,
                    "channel_axis": candidate.channel_axis,
                    "block_axis": candidate.block_axis,
                    **self.config.as_dict(),
                }
            elif reason:
                weights.pop(key, None)
                skipped[key] = {**entry, "reason": reason}
        return func.with_attr(WEIGHTS_ATTR, weights).with_attr(SKIPPED_ATTR, skipped)

    def _skip_reason(self, candidate: Candidate, node: str, op_type: str, decided: bool) -> str | None:
        """None: annotate. "": leave as an earlier application decided. Else the reason to skip."""
        if op_type not in self.op_types:
            return "" if decided else f"op type {op_type} not selected"
        if node in self.excluded_nodes:
            return "excluded by the user"
        reason = _unsupported_reason(candidate, self.config)
        if reason is not None and self.strict:
            raise ValueError(f"strict LPBQ: {node}: {reason}")
        return reason
