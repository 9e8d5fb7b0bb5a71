"""Import an ONNX model into a Relax IRModule whose only parameters are the LPBQ candidate weights.

The last step of the frontend: :mod:`lpbq_tvm.onnx_model` reads and checks the model,
:mod:`lpbq_tvm.preparation` prepares it (shapes pinned and inferred, constants folded, weights as
the only initializers; its docstring lists the steps), then ``tvm.relax.frontend.onnx.from_onnx``
imports it. An importer failure names the op it failed on. ONNX node names do not survive the
import; the ``"lpbq.onnx_nodes"`` attribute of ``main`` (:mod:`lpbq_tvm.attrs`) maps each weight
parameter to its node and op type, weight parameters keep their ONNX names, and each output keeps
the dtype the model declares (TVM's importer changes some). Gathers by run-time indices clamp them
(:class:`~lpbq_tvm.passes.bounded_gather.BoundedGather`) rather than read out of bounds.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

import onnx

from lpbq_tvm.attrs import ONNX_NODES_ATTR
from lpbq_tvm.onnx_layers import WeightLayer, find_weight_layers
from lpbq_tvm.onnx_model import (
    ModelImportError,
    TensorInfo,
    checker_message,
    graph_inputs,
    last_line,
    load_onnx,
    random_inputs,
    tensor_info,
)
from lpbq_tvm.preparation import MASK_VALUE, Preparation, prepare_onnx

__all__ = [
    "MASK_VALUE",
    "ImportedModel",
    "ModelImportError",
    "Preparation",
    "TensorInfo",
    "import_onnx",
    "load_onnx",
    "prepare_onnx",
    "random_inputs",
]


@dataclass(frozen=True, eq=False)
class ImportedModel:
    """A prepared ONNX model and its Relax import.

    ``mod["main"]`` takes the graph inputs, then the weights (values in its ``"params"``
    attribute); ``layers`` maps each weight parameter name to its Gemm / MatMul / Conv node.
    """

    onnx_model: onnx.ModelProto
    mod: object  # tvm.IRModule
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers: dict[str, WeightLayer]
    preparation: tuple[str, ...] = ()  # what graph preparation changed, one line each


def import_onnx(
    model: str | PathLike | onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> ImportedModel:
    """Prepare ``model`` and import it into Relax; see the module docstring."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from lpbq_tvm.passes.bounded_gather import BoundedGather

    preparation = prepare_onnx(model, input_shapes)
    prepared = preparation.model
    inputs = tuple(tensor_info(vi) for vi in graph_inputs(prepared))
    outputs = tuple(tensor_info(vi) for vi in prepared.graph.output)
    printed = io.StringIO()  # the importer prints the op it failed on, then raises
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            for message in (checker_message(prepared), "Failed to serialize proto"):  # (the latter: over 2 GB)
                if message is not None:  # what its own checker call says, preparation has reported already
                    warnings.filterwarnings("ignore", re.escape(message), UserWarning)
            mod = from_onnx(
                prepared,
                shape_dict={info.name: list(info.shape) for info in inputs},
                dtype_dict={info.name: info.dtype for info in inputs},
                keep_params_in_input=True,
                sanitize_input_names=False,
            )
    except Exception as error:  # the importer raises many types; report the op and the last line
        raise ModelImportError(
            f"TVM's ONNX importer failed{_failed_op(prepared, printed.getvalue())}: {last_line(error)}"
        ) from error
    layers = {layer.weight_name: layer for layer in find_weight_layers(prepared)}
    onnx_nodes = {
        name: {"node": layer.node_name, "op_type": layer.op_type, "has_bias": layer.has_bias}
        for name, layer in layers.items()
    }
    main = _with_onnx_weight_names(mod["main"], [init.name for init in prepared.graph.initializer])
    main, cast = _with_declared_output_dtypes(main, outputs)
    mod.update_func(mod.get_global_var("main"), main.with_attr(ONNX_NODES_ATTR, onnx_nodes))
    changes = (*preparation.changes, *cast)
    mod = relax.transform.Normalize()(BoundedGather()(mod))
    return ImportedModel(prepared, mod, inputs, outputs, layers, changes)


def _with_declared_output_dtypes(func, outputs: Sequence[TensorInfo]):
    """``func`` returning each output in the dtype the model declares, and a note per cast: TVM's
    importer can change one (its OneHot returns float64 for float32 values)."""
    from tvm import relax

    returned = func.body.body
    single = len(outputs) == 1  # (one output that is a sequence is a tuple too)
    types = [returned.ty] if single else list(returned.ty.fields)
    notes, fields, declared = [], [], []
    for index, (info, ty) in enumerate(zip(outputs, types, strict=True)):
        field = returned if single else relax.TupleGetItem(returned, index)
        if not info.sequence and str(ty.dtype) != info.dtype:
            notes.append(f"output '{info.name}': TVM's importer computes {ty.dtype}; cast to the declared {info.dtype}")
            field, ty = relax.op.astype(field, info.dtype), relax.TensorType(ty.shape, info.dtype)
        fields.append(field)
        declared.append(ty)
    if not notes:
        return func, []
    if single:
        body, ret_ty = relax.SeqExpr(func.body.blocks, fields[0]), declared[0]
    else:
        body, ret_ty = relax.SeqExpr(func.body.blocks, relax.Tuple(fields)), relax.TupleType(declared)
    return relax.Function(func.params, body, ret_ty, is_pure=func.is_pure, attrs=func.attrs), notes


def _failed_op(model: onnx.ModelProto, printed: str) -> str:
    """`` on <op> (nodes: ...)`` from what TVM's importer printed before raising, or nothing."""
    match = re.search(r"Error converting operator (\w+)", printed)
    if match is None:
        return ""
    op = match.group(1)
    nodes = [node.name or node.output[0] for node in model.graph.node if node.op_type == op]
    return f" on {op} (nodes: {', '.join(nodes[:5])}{', ...' if len(nodes) > 5 else ''})"


def _with_onnx_weight_names(func, initializers: Sequence[str]):
    """``func`` with each weight parameter named as its ONNX initializer.

    ``from_onnx`` drops an ``onnx::`` prefix from parameter names (PyTorch names unnamed weights
    ``onnx::MatMul_666``); everything downstream (the node table, encodings, exports) speaks ONNX
    names, so the parameters take them back."""
    from tvm import relax

    from lpbq_tvm.attrs import num_inputs

    by_relax_name = {name.removeprefix("onnx::"): name for name in initializers}
    weights = func.params[num_inputs(func) :]
    renamed = {
        param: relax.Var(by_relax_name[param.name], param.ty)
        for param in weights
        if by_relax_name.get(param.name, param.name) != param.name
    }
    if not renamed:
        return func

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_var_(self, var):
            return renamed.get(var, var)

        def visit_var_def_(self, var):
            return renamed.get(var, var)

    return Rename().visit_expr(func)
