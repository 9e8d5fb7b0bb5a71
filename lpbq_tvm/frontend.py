"""Import an ONNX model into a Relax IRModule whose only parameters are the LPBQ candidate weights.

The last step of the frontend: :mod:`lpbq_tvm.onnx_model` reads and checks the model,
:mod:`lpbq_tvm.preparation` prepares it (shapes pinned and inferred, constants folded, weights as
the only initializers; its docstring lists the steps), then ``tvm.relax.frontend.onnx.from_onnx``
imports its :func:`~lpbq_tvm.onnx_model.skeleton`, the weights typed inputs: the importer never
copies them, and each becomes a parameter holding the one copy the import keeps (numpy views of
it serve the encoder and onnxruntime; an import of the same model at other shapes shares it, so
a decoder's prefill and decode graphs hold one copy). An importer failure names the op it failed
on. ONNX node names do not survive the import; the ``"lpbq.onnx_nodes"`` attribute of ``main``
(:mod:`lpbq_tvm.attrs`) maps each weight parameter to its node and op type, weight parameters keep
their ONNX names, and each output keeps the dtype the model declares (TVM's importer changes some).
Gathers by run-time indices clamp them
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

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lpbq_tvm.attrs import NUM_INPUT_ATTR, ONNX_NODES_ATTR, PARAMS_ATTR
from lpbq_tvm.onnx_layers import WeightLayer, find_weight_layers
from lpbq_tvm.onnx_model import (
    ModelImportError,
    TensorInfo,
    checker_message,
    graph_inputs,
    last_line,
    load_onnx,
    random_inputs,
    skeleton,
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
    """A prepared ONNX model and its Relax import, holding one copy of the weights.

    ``mod["main"]`` takes the graph inputs, then the weights (values in its ``"params"``
    attribute, the only copy); ``graph`` is the prepared model with its weights as typed graph
    inputs after the model's own (:func:`~lpbq_tvm.onnx_model.skeleton`), ``weights`` read-only numpy
    views of the parameters by name; ``layers`` maps each weight parameter name to its Gemm /
    MatMul / Conv node. :meth:`onnx_model` builds the prepared model with its weights.
    """

    graph: onnx.ModelProto
    weights: dict[str, np.ndarray]
    mod: object  # tvm.IRModule
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers: dict[str, WeightLayer]
    preparation: tuple[str, ...] = ()  # what graph preparation changed, one line each

    def onnx_model(self) -> onnx.ModelProto:
        """The prepared fp32 model with its weights as initializers (a copy of them, made on each call)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.graph)
        kept = [vi for vi in model.graph.input if vi.name not in self.weights]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        for name, value in self.weights.items():  # (field by field: copying a message serializes it, <= 2 GB)
            tensor = model.graph.initializer.add()
            tensor.name, tensor.data_type = name, helper.np_dtype_to_tensor_dtype(value.dtype)
            tensor.dims.extend(value.shape)
            tensor.raw_data = value.tobytes()
        return model


def import_onnx(
    model: str | PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    shared: ImportedModel | None = None,
) -> ImportedModel:
    """Prepare ``model`` and import it into Relax; see the module docstring. With ``shared`` (an import
    of the same model at other shapes), the weights are that import's parameters, checked equal, not a
    second copy."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from lpbq_tvm.passes.bounded_gather import BoundedGather

    preparation = prepare_onnx(model, input_shapes)
    graph = skeleton(preparation.model, inline_elements=-1)
    parameters = _parameters(preparation.model, shared)
    changes = preparation.changes
    del preparation  # with the prepared proto, its copy of the weights
    inputs = tuple(tensor_info(vi) for vi in graph_inputs(graph) if vi.name not in parameters)
    outputs = tuple(tensor_info(vi) for vi in graph.graph.output)
    printed = io.StringIO()  # the importer prints the op it failed on, then raises
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            for message in (checker_message(graph), "Failed to serialize proto"):  # (the latter: over 2 GB)
                if message is not None:  # what its own checker call says, preparation has reported already
                    warnings.filterwarnings("ignore", re.escape(message), UserWarning)
            mod = from_onnx(
                graph,
                shape_dict={info.name: list(info.shape) for info in inputs},
                dtype_dict={info.name: info.dtype for info in inputs},
                sanitize_input_names=False,
            )
    except Exception as error:  # the importer raises many types; report the op and the last line
        raise ModelImportError(
            f"TVM's ONNX importer failed{_failed_op(graph, printed.getvalue())}: {last_line(error)}"
        ) from error
    weights = {name: _read_only_view(tensor) for name, tensor in parameters.items()}
    layers = {layer.weight_name: layer for layer in find_weight_layers(graph, weights)}
    onnx_nodes = {
        name: {"node": layer.node_name, "op_type": layer.op_type, "has_bias": layer.has_bias}
        for name, layer in layers.items()
    }
    main = mod["main"].with_attr(NUM_INPUT_ATTR, len(inputs))
    if parameters:
        main = main.with_attr(PARAMS_ATTR, list(parameters.values()))
    main, cast = _with_declared_output_dtypes(main, outputs)
    mod.update_func(mod.get_global_var("main"), main.with_attr(ONNX_NODES_ATTR, onnx_nodes))
    changes = (*changes, *cast)
    mod = relax.transform.Normalize()(BoundedGather()(mod))
    return ImportedModel(graph, weights, mod, inputs, outputs, layers, changes)


def _parameters(prepared: onnx.ModelProto, shared: ImportedModel | None) -> dict[str, object]:
    """The prepared model's initializers (its weights, see :mod:`lpbq_tvm.preparation`) as TVM tensors by
    name, in order: ``shared``'s tensor where it holds the same value, else a copy of the initializer."""
    import tvm

    theirs = {} if shared is None else dict(zip(shared.weights, shared.mod["main"].attrs[PARAMS_ATTR], strict=True))
    parameters = {}
    for init in prepared.graph.initializer:
        value = numpy_helper.to_array(init)
        view = shared.weights.get(init.name) if shared is not None else None
        same = view is not None and view.shape == value.shape and view.dtype == value.dtype
        if same and np.array_equal(view, value, equal_nan=True):
            parameters[init.name] = theirs[init.name]
        else:
            parameters[init.name] = tvm.runtime.tensor(value)
    return parameters


def _read_only_view(tensor) -> np.ndarray:
    """A numpy array sharing ``tensor``'s memory, not writable (a copy for dtypes DLPack cannot describe)."""
    try:
        view = np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError):
        view = tensor.numpy()
    view.flags.writeable = False
    return view


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
