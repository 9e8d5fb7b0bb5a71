"""Reading and checking an ONNX model, and the description of its inputs and outputs.

The first step of the frontend (:mod:`lpbq_tvm.preparation` prepares, :mod:`lpbq_tvm.frontend`
imports): :func:`load_onnx` reads a file and its external data, which it reads only from files
inside the model's folder (no ``..``, absolute paths or symlinks leading out);
:func:`lenient_check` runs the ONNX checker, refusing only a graph that reads a tensor nothing
defines. The checker and ONNX shape inference serialize what they are given, so a model over
protobuf's 2 GB limit is given to them as its :func:`skeleton`, its large weights made typed
graph inputs. :class:`TensorInfo` describes an input or an output; :func:`random_inputs` makes
seeded values for inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

__all__ = [
    "ModelImportError",
    "TensorInfo",
    "checker_message",
    "graph_inputs",
    "last_line",
    "lenient_check",
    "load_onnx",
    "nested_nodes",
    "random_inputs",
    "session_with_weights",
    "skeleton",
    "subgraphs",
    "tensor_info",
    "value_info_shape",
]


class ModelImportError(ValueError):
    """The ONNX model cannot be read, checked, pinned or imported; the message says which part."""


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output. Inputs have static shapes (pinned on import); an output's size that
    depends on the data (NonZero, Unique, ...) is None. A ``sequence`` output (SequenceConstruct,
    SplitToSequence) is a list of tensors of this dtype (and shape, where all have the same)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    sequence: bool = False


def _external_data_files(proto: onnx.ModelProto, base: Path, where: str) -> None:
    """Refuse external-data locations that leave the model's folder (``..``, absolute, symlinks)."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = base.resolve()
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        candidate = Path(location)
        resolved = (root / candidate).resolve()
        if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(root):
            msg = f"{where}: external data of tensor '{tensor.name}' points outside the model's folder ({location!r})"
            raise ModelImportError(msg)
        if not resolved.is_file():
            raise ModelImportError(f"{where}: external data file {location!r} of tensor '{tensor.name}' is missing")


def _origin(model: str | PathLike | onnx.ModelProto) -> tuple[str, Path | None]:
    """How messages name ``model``, and its path (None for an in-memory model)."""
    if isinstance(model, onnx.ModelProto):
        return "the given ONNX model", None
    return f"ONNX model '{Path(model)}'", Path(model)


def load_onnx(model: str | PathLike | onnx.ModelProto, *, check: bool = True) -> onnx.ModelProto:
    """Read a model, with its external data; ``ModelImportError`` names the file and what is wrong with it.

    External data is read only from files inside the model's folder (no ``..``, absolute paths or
    symlinks leading out). With ``check``, the ONNX checker must pass too (run from the path for a
    model over 2 GB, as protobuf requires); graph preparation is more lenient (:func:`lenient_check`).
    """
    where, path = _origin(model)
    if path is None:
        proto = model
    else:
        if path.is_dir():
            raise ModelImportError(f"cannot read {where}: it is a directory")
        if not path.is_file():
            raise ModelImportError(f"cannot read {where}: no such file")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as error:  # protobuf raises its own DecodeError types
            raise ModelImportError(f"cannot read {where}: not a valid ONNX file ({error})") from error
    if not proto.graph.node:
        raise ModelImportError(f"{where} has an empty graph")
    if check and (message := checker_message(model)) is not None:
        raise ModelImportError(f"{where} fails the ONNX checker: {message}")
    if path is not None:
        _external_data_files(proto, path.parent, where)
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return proto


def checker_message(model: str | PathLike | onnx.ModelProto) -> str | None:
    """The first line of what the ONNX checker finds wrong with ``model``, or None. A path is checked
    from the file (which works past protobuf's 2 GB limit), a model in memory as its :func:`skeleton`."""
    _, path = _origin(model)
    try:
        onnx.checker.check_model(str(path) if path is not None else skeleton(model))
    except onnx.checker.ValidationError as error:
        return str(error).strip().splitlines()[0]
    return None


def lenient_check(model: str | PathLike | onnx.ModelProto, proto: onnx.ModelProto) -> list[str]:
    """The ONNX checker, strict only where it protects: a graph that reads a tensor nothing defines is
    refused; what else the checker finds (a value_info without a shape, a contrib domain without an
    opset import, an op version it does not know) is reported and the model imported anyway, as
    TVM's importer may well take it."""
    message = checker_message(model)
    if message is None:
        return []
    where, _ = _origin(model)
    if (undefined := _undefined_input(proto.graph, set())) is not None:
        raise ModelImportError(f"{where} fails the ONNX checker: {message} (tensor '{undefined}' is never defined)")
    return [f"the ONNX checker reports: {message}; imported anyway"]


def _undefined_input(graph: onnx.GraphProto, outer: set[str]) -> str | None:
    """A tensor some node of ``graph`` (or of its subgraphs) reads before anything defines it, or None."""
    defined = outer | {vi.name for vi in graph.input} | {init.name for init in graph.initializer} | {""}
    for node in graph.node:
        missing = [name for name in node.input if name not in defined]
        if missing:
            return missing[0]
        for sub in subgraphs(node):
            if (inner := _undefined_input(sub, defined)) is not None:
                return inner
        defined |= set(node.output)
    return None


SKELETON_TENSOR_ELEMENTS = 1024


def skeleton(model: onnx.ModelProto, inline_elements: int = SKELETON_TENSOR_ELEMENTS) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``inline_elements`` are graph inputs of their type
    and shape instead, after the model's own inputs. ONNX shape inference and the checker read the
    data of small shape-like tensors only, and the copy stays below protobuf's 2 GB limit (they
    serialize what they are given) however large the weights; onnxruntime runs it with the weights
    fed as inputs, and the frontend imports it with ``inline_elements=-1`` (every weight an input)."""
    skeleton = _copy_except(model, "graph")
    skeleton.graph.CopyFrom(_copy_except(model.graph, "initializer"))
    inputs = {vi.name for vi in model.graph.input}
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= inline_elements:
            skeleton.graph.initializer.append(tensor)
        elif tensor.name not in inputs:  # (IR < 4 lists initializers as inputs already)
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


def session_with_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], options=None):
    """An onnxruntime CPU session of ``model`` (a :func:`skeleton`) whose graph inputs named in ``weights``
    are initializers holding those arrays: onnxruntime's external initializers (no serialized model,
    so no 2 GB limit; onnxruntime keeps its own copy of each, as for any initializer), constants as in
    the model with these initializers, so the session computes exactly what that model does.
    ``options`` (one session's: they take the initializers) default to onnxruntime's."""
    import onnxruntime as ort

    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    kept = [vi for vi in bound.graph.input if vi.name not in weights]
    del bound.graph.input[:]
    bound.graph.input.extend(kept)
    values = {}
    for name, array in weights.items():
        array = np.ascontiguousarray(array)
        placeholder = onnx.TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
            dims=array.shape,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(array.nbytes))):
            placeholder.external_data.add(key=key, value=value)
        bound.graph.initializer.append(placeholder)
        values[name] = ort.OrtValue.ortvalue_from_numpy(array)
    options = options or ort.SessionOptions()
    options.add_external_initializers(list(values), list(values.values()))
    session = ort.InferenceSession(bound.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.lpbq_weights = values  # (keeps them alive with the session)
    return session


def _copy_except(message, excluded: str):
    """A copy of a protobuf ``message`` without its field ``excluded`` (never copied, however large)."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == excluded:
            continue
        if field.is_repeated:
            getattr(copy, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def value_info_shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs an ``If`` / ``Loop`` / ``Scan`` node holds (its branches, its body)."""
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def nested_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes inside the subgraphs of ``graph``'s nodes, at any depth (not ``graph``'s own)."""
    return [inner for node in graph.node for sub in subgraphs(node) for inner in [*sub.node, *nested_nodes(sub)]]


def tensor_info(value_info: onnx.ValueInfoProto) -> TensorInfo:
    sequence = value_info.type.HasField("sequence_type")
    tensor = value_info.type.sequence_type.elem_type.tensor_type if sequence else value_info.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else None for d in (tensor.shape.dim if tensor.HasField("shape") else ())
    )
    return TensorInfo(value_info.name, dims, str(np.dtype(dtype)), sequence)


def random_inputs(inputs: Sequence[TensorInfo], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random values for ``inputs``: N(0, 1) floats, integers and booleans 0 or 1 (valid ids,
    masks and flags)."""
    rng = np.random.default_rng(seed)
    values = {}
    for info in inputs:
        dtype = np.dtype(info.dtype)
        discrete = np.issubdtype(dtype, np.integer) or dtype == np.bool_
        values[info.name] = (rng.integers(0, 2, info.shape) if discrete else rng.standard_normal(info.shape)).astype(
            dtype
        )
    return values


def last_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1]
