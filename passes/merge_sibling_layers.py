"""MergeSiblingLayers: one layer for the encoded dense layers that read the same input.

A transformer block reads one normalized tensor into three projections (q, k, v) and another into two
(a SwiGLU's gate and up). As separate kernels each streams a small weight and shares the cores out
over few tiles; as one layer over the weights side by side the same bytes take one kernel call, with
all the channels' tiles to share out (docs/performance.md, "Sibling layers merged").

Match: in functions with ``"lpbq.encodings"``, ``matmul(x, w)`` and ``matmul(x, permute_dims(w))``
(Gemm's ``transB``) with a 2-D encoded weight, grouped by their input ``x`` and weight form. Layers
join a group only when one kernel can compute them all: the same LPBQ config and depth, the same
activation width annotations and the same calibrated input range (they read the same tensor, so
calibration records the same one). A layer whose input is read by a single encoded layer stays, and
so does one whose weight another layer reads too (LowerLPBQ keeps a merged weight's codes only once).

Rewrite: ``y = matmul(x, concat([w1, w2, ...], channel axis))`` (transposed as the layers were) where
the first layer was, and each layer's own binding becomes ``strided_slice(y)`` of its channels: the
module computes what it did, in fp32 too. LowerLPBQ lowers a weight that is a concatenation of
encoded weights with their encodings side by side (packed parameters ``<w1>+<w2>+….lpbq_*``); a
bias add stays on each slice, where fusion puts it into the slice's consumer.

Run it after EncodeLPBQ and before LowerLPBQ; not for graphs that requantize each layer's output
(the htp-sim target), whose layers must stay one per ONNX node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import tvm
from tvm import relax

from lpbq_tvm.attrs import (
    ACTIVATION_BITWIDTH,
    ACTIVATION_RANGES_ATTR,
    ENCODINGS_ATTR,
    WEIGHTS_ATTR,
    function_attr,
)
from lpbq_tvm.passes._layers import is_weight, map_relax_functions, read_counts, weight_key

__all__ = ["MergeSiblingLayers"]

# What an annotation must agree on for layers to share one kernel.
_CONFIG_FIELDS = ("bitwidth", "decompressed_bw", "block_size", "block_grouping", "encoder", ACTIVATION_BITWIDTH)


@dataclass(frozen=True)
class _Sibling:
    """One encoded dense layer: the index of its block, its binding, its weight (``[K, N]``, or ``[N, K]``
    when the layer multiplies by its transpose)."""

    block: int
    binding: relax.VarBinding
    weight: relax.Expr
    transposed: bool

    @property
    def axis(self) -> int:
        """The weight's channel axis."""
        return 0 if self.transposed else 1

    @property
    def channels(self) -> int:
        return int(self.weight.ty.shape[self.axis])


def _siblings(blocks: list[relax.BindingBlock], func: relax.Function) -> list[list[_Sibling]]:
    """Groups of two or more encoded dense layers of ``func``, each in one of its ``blocks``, that one
    kernel can compute."""
    annotations = function_attr(func, WEIGHTS_ATTR)
    encoded = set(function_attr(func, ENCODINGS_ATTR))
    ranges = function_attr(func, ACTIVATION_RANGES_ATTR)
    values = relax.analysis.get_var2val(func)
    reads = read_counts(func)
    groups: dict[tuple, list[_Sibling]] = defaultdict(list)
    for index, block in enumerate(blocks):
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.matmul"):
                continue
            x, weight = call.args
            transposed = False
            bound = values.get(weight) if isinstance(weight, relax.Var) else None
            if isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.permute_dims"):
                axes = bound.attrs.axes
                if axes is not None and [int(a) for a in axes] != [1, 0]:
                    continue
                weight, transposed = bound.args[0], True
            if not is_weight(weight, func) or len(weight.ty.shape) != 2 or call.ty.shape is None:
                continue
            if isinstance(weight, relax.Var) and reads[weight] > 1:
                continue  # a weight other layers read too keeps a layer (and an encoding) of its own
            key = weight_key(weight, annotations)
            if key not in encoded:
                continue
            annotation = annotations[key]
            depth = int(weight.ty.shape[1 if transposed else 0])
            shared = tuple(str(annotation.get(field)) for field in _CONFIG_FIELDS)
            bounds = ranges.get(key, {}).get("input")
            input_range = None if bounds is None else tuple(float(bound) for bound in bounds)
            kind = (transposed, isinstance(weight, relax.Var), str(weight.ty.dtype), depth)
            signature = (index, x, kind, shared, input_range)
            groups[signature].append(_Sibling(index, binding, weight, transposed))
    return [group for group in groups.values() if len(group) > 1]


def _merge_block(block: relax.BindingBlock, groups: list[list[_Sibling]]) -> relax.BindingBlock:
    """``block`` with each group's merged layer in place of its first layer and slices for all of them."""
    first_of = {group[0].binding.var: group for group in groups}
    sliced: dict[relax.Var, relax.Expr] = {}
    dataflow = isinstance(block, relax.DataflowBlock)
    bb = relax.BlockBuilder()
    bindings = []

    def emit(name: str, value: relax.Expr) -> relax.Var:
        value = bb.normalize(value)
        var = relax.DataflowVar(name, value.ty) if dataflow else relax.Var(name, value.ty)
        bindings.append(relax.VarBinding(var, value))
        return var

    for binding in block.bindings:
        group = first_of.get(binding.var)
        if group is not None:
            name = "_".join(sibling.binding.var.name for sibling in group)
            weight = emit(f"{name}_weight", relax.op.concat([sibling.weight for sibling in group], group[0].axis))
            if group[0].transposed:
                weight = emit(f"{name}_weight_t", relax.op.permute_dims(weight, [1, 0]))
            merged = emit(name, relax.op.matmul(binding.value.args[0], weight, binding.value.attrs.out_dtype))
            begin = 0
            for sibling in group:
                end = begin + sibling.channels
                sliced[sibling.binding.var] = relax.op.strided_slice(merged, axes=[-1], begin=[begin], end=[end])
                begin = end
        if binding.var in sliced:
            bindings.append(relax.VarBinding(binding.var, bb.normalize(sliced[binding.var])))
        else:
            bindings.append(binding)
    return relax.DataflowBlock(bindings) if dataflow else relax.BindingBlock(bindings)


def _merge(func: relax.Function) -> relax.Function:
    blocks = list(func.body.blocks)
    groups = _siblings(blocks, func)
    if not groups:
        return func
    by_block = defaultdict(list)
    for group in groups:
        by_block[group[0].block].append(group)
    for index, block_groups in by_block.items():
        blocks[index] = _merge_block(blocks[index], block_groups)
    body = relax.SeqExpr(blocks, func.body.body)
    return relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)


@tvm.transform.module_pass(opt_level=0, name="MergeSiblingLayers")
class MergeSiblingLayers:
    """Merge encoded dense layers that read the same input into one; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return map_relax_functions(mod, _merge)
