"""Graph preparation: the ONNX model made ready for TVM's importer, on a copy, each change logged.

Steps, in order (each names the node or input it rejects; :mod:`lpbq_tvm.onnx_model` reads and
checks the model first, :mod:`lpbq_tvm.frontend` imports the result):

1. initializers listed as graph inputs too (IR < 4) become constants, not inputs;
2. pin dynamic input dimensions: ``input_shapes[name]`` when given, else a dynamic *leading*
   dimension becomes 1 (batch 1); any other dynamic dimension needs an override;
3. ONNX shape inference (non-strict where an op has no shape function; run on the model's
   skeleton, so a model over 2 GB never has to be one protobuf) and constant folding
   (``onnxscript.optimizer.fold_constants``, which keeps node and weight names), so that shape
   sub-graphs such as ``Shape -> Slice -> Concat`` feeding a ``Reshape`` become constants the
   importer can read; whatever feeds a layer's weight or bias folds whatever its size;
4. ``DequantizeLinear`` of constants (a quantized export, e.g. INT4 weights) is folded into float
   constants; every ``Constant`` node and every initializer that is not the float weight of a
   Gemm / MatMul / Conv or a float tensor of 1 MiB or more (an embedding table) becomes a ``Constant``
   with a tensor value; those stay initializers, and the frontend makes exactly them parameters
   (lifting int64 shape tensors as parameters breaks compilation; inlining a large table compiles
   it into the library); nodes onnxscript's rewrites leave invalid for the model's opset are repaired;
5. float constants holding mask sentinels (magnitude >= 1e30 or infinite, e.g. the -3.4e38 of an
   attention mask) are clamped to +-1e4: ``exp(-1e4)`` is still 0 in a softmax, while the HTP's
   fp16 float ops and calibrated ranges stay finite. The clamp is kept only if onnxruntime computes
   the same outputs, bit for bit, with and without it on two sets of seeded random inputs (it does
   not where a mask is compared with -inf, or with fully masked rows that the inputs happen to hold),
   both run as skeletons fed one copy of the weights;
6. the ops are checked against what TVM's importer converts (a layer another tool quantized is
   named; one TVM cannot import is refused with a hint), and a model holding float8 tensors warned
   about (TVM 0.27 converts float8 subnormals wrongly).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from lpbq_tvm.onnx_model import (
    ModelImportError,
    TensorInfo,
    checker_message,
    graph_inputs,
    last_line,
    lenient_check,
    load_onnx,
    nested_nodes,
    random_inputs,
    skeleton,
    tensor_info,
    value_info_shape,
)

__all__ = ["MASK_VALUE", "Preparation", "prepare_onnx"]

logger = logging.getLogger(__name__)


DEFAULT_BATCH = 1
# A float constant this large stays a parameter: inlined, it would be compiled into the library, once per
# graph that reads it (a decoder's prefill and decode graphs).
LARGE_CONSTANT_BYTES = 1 << 20
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


@dataclass(frozen=True, eq=False)
class Preparation:
    """A prepared model and, one line each, what preparation changed."""

    model: onnx.ModelProto
    changes: tuple[str, ...]


def prepare_onnx(
    model: str | PathLike | onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> Preparation:
    """The steps of the module docstring on a copy (the input is not modified), after the ONNX
    checker (:func:`~lpbq_tvm.onnx_model.lenient_check`)."""
    prepared = load_onnx(model, check=False)
    checker = lenient_check(model, prepared)
    if isinstance(model, onnx.ModelProto):  # the caller's: prepared on a copy (a file is read afresh)
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
    changes = checker + _initializers_are_not_inputs(prepared)
    changes += _pin_input_shapes(prepared, input_shapes or {})
    changes += _import_used_domains(prepared)
    nodes_before = len(prepared.graph.node)
    changes += _infer_shapes(prepared)
    prepared = _fold_constants(prepared)
    if len(prepared.graph.node) != nodes_before:
        changes.append(f"constant folding: {nodes_before} -> {len(prepared.graph.node)} nodes")
    changes += _weights_as_only_initializers(prepared)
    _repair_folded_nodes(prepared)
    changes += _clamp_mask_constants(prepared)
    changes += _float8_warning(prepared)
    _check_supported_ops(prepared)
    changes += _quantized_layers(prepared)
    if not checker and (message := checker_message(prepared)) is not None:  # the input passed: our own doing
        raise ModelImportError(f"graph preparation produced an invalid model ({message}); please report it")
    return Preparation(prepared, tuple(changes))


def _pin_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Give every graph input a static shape, in place; returns what changed, one line per input."""
    changes = []
    inputs = graph_inputs(model)
    unknown = sorted(set(input_shapes) - {vi.name for vi in inputs})
    if unknown:
        known = ", ".join(vi.name for vi in inputs)
        raise ModelImportError(f"input_shapes names unknown input(s) {', '.join(unknown)}; the model's inputs: {known}")
    for value_info in inputs:
        dims = value_info_shape(value_info)
        override = input_shapes.get(value_info.name)
        if override is not None:
            override = [int(d) for d in override]
            if len(override) != len(dims) or any(
                isinstance(dim, int) and dim and dim != new for dim, new in zip(dims, override, strict=True)
            ):
                raise ModelImportError(
                    f"input '{value_info.name}' has shape {dims}; the override {override} does not match it"
                )
            pinned = override
        else:
            pinned = []
            for axis, dim in enumerate(dims):
                if isinstance(dim, int) and dim > 0:
                    pinned.append(dim)
                elif axis == 0:
                    logger.info(
                        "input '%s': dynamic batch dimension %r pinned to %d", value_info.name, dim, DEFAULT_BATCH
                    )
                    pinned.append(DEFAULT_BATCH)
                else:
                    raise ModelImportError(
                        f"input '{value_info.name}' of shape {dims} has dynamic dimension {axis} ({dim!r}); "
                        f"give its size, e.g. input_shapes={{'{value_info.name}': [...]}} (CLI: --input-shape)"
                    )
        if pinned != dims:
            changes.append(f"input '{value_info.name}': shape {dims} pinned to {pinned}")
        shape = value_info.type.tensor_type.shape
        del shape.dim[:]
        for size in pinned:
            shape.dim.add().dim_value = size
    return changes


def _initializers_are_not_inputs(model: onnx.ModelProto) -> list[str]:
    """Initializers listed as graph inputs too (IR < 4, ``keep_initializers_as_inputs`` exports) are
    weights or constants here, not inputs that a caller may override: from IR 4 on an initializer
    need not be an input, and constant folding leaves what reads an input alone."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializers]
    if len(inputs) == len(graph.input):
        return []
    count = len(graph.input) - len(inputs)
    del graph.input[:]
    graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    return [f"{count} initializers listed as graph inputs are constants, not inputs"]


def _import_used_domains(model: onnx.ModelProto) -> list[str]:
    """An opset import for every domain the nodes use (exporters leave out ``com.microsoft``'s)."""
    imported = {opset.domain for opset in model.opset_import}
    used = {node.domain for node in [*model.graph.node, *nested_nodes(model.graph)]} - {"ai.onnx"}
    missing = sorted(used - imported - ({""} if "ai.onnx" in imported else set()))
    for domain in missing:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return [f"opset import added for domain '{domain}' (version 1)" for domain in missing]


def _infer_shapes(model: onnx.ModelProto) -> list[str]:
    """Infer the model's shapes from the pinned inputs, in place; returns what could not be inferred.

    Value infos and output shapes are inferred anew, on the model's :func:`skeleton`; an op without
    (or with a failing) ONNX shape function stops strict inference, and non-strict inference infers
    what it can; an output whose shape nothing infers keeps the one the model declared. TVM's
    importer infers its own shapes."""
    hollow = skeleton(model)
    del hollow.graph.value_info[:]
    for output in hollow.graph.output:
        output.type.tensor_type.ClearField("shape")
    changes = []
    try:
        inferred = shape_inference.infer_shapes(hollow, strict_mode=True, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        changes.append(f"ONNX shape inference stopped short ({last_line(error)}); shapes left to TVM's importer")
        try:
            inferred = shape_inference.infer_shapes(hollow, strict_mode=False, data_prop=True)
        except (shape_inference.InferenceError, onnx.checker.ValidationError) as again:
            changes.append(f"non-strict ONNX shape inference failed too ({last_line(again)})")
            inferred = hollow
    graph = model.graph
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)
    del graph.node[:]  # their subgraphs' value infos too
    graph.node.extend(inferred.graph.node)
    for output, result in zip(graph.output, inferred.graph.output, strict=True):
        if result.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(result.type)
    return changes


FOLD_SIZE_LIMIT = 2**31 // 4  # elements: a float32 tensor up to 2 GiB


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Step 3's folding: the model with its constant sub-graphs folded and unused nodes removed, in
    one round trip through onnxscript's IR (each of its calls on a proto makes two)."""
    import onnxscript.optimizer
    from onnxscript import ir

    folded = ir.serde.deserialize_model(model)
    # Weights computed from constants (a Transpose or a Cast of an fp16 weight, a ConstantOfShape,
    # which onnxscript keeps by default) fold whatever their size, so that they are weights;
    # onnxscript's limits (8192 elements in, 512 x 512 out) would leave them computed at run time.
    parameters = {name for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv") for name in n.input[1:]}
    onnxscript.optimizer.fold_constants(
        folded,
        input_size_limit=FOLD_SIZE_LIMIT,
        output_size_limit=FOLD_SIZE_LIMIT,
        should_fold=lambda node: True if any(out.name in parameters for out in node.outputs) else None,
    )
    onnxscript.optimizer.remove_unused_nodes(folded)
    serialized = ir.serde.serialize_model(folded)
    del folded
    gc.collect()  # the IR's reference cycles hold the input's weights until the collector next runs
    return serialized


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto:
    """The tensor of a ``Constant`` node, whichever of its value attributes it uses."""
    (attribute,) = node.attribute
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
    else:
        dtype = {
            "value_int": np.int64,
            "value_ints": np.int64,
            "value_float": np.float32,
            "value_floats": np.float32,
        }.get(attribute.name)
        if dtype is None:
            raise ModelImportError(f"Constant node '{node.name}' uses unsupported attribute {attribute.name}")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype))
    tensor.name = node.output[0]
    return tensor


def _dequantize(value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int, block_size: int):
    """ONNX DequantizeLinear (per tensor, per axis or blocked along ``axis``) in numpy."""
    zero_point = np.zeros_like(scale, dtype=np.int32) if zero_point is None else zero_point.astype(np.int32)
    if scale.ndim and block_size:
        scale = np.repeat(scale, block_size, axis=axis)
        zero_point = np.repeat(zero_point, block_size, axis=axis)
    elif scale.ndim:
        shape = [1] * value.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((value.astype(np.int32) - zero_point) * scale).astype(np.float32)


def _fold_constant_dequantize(graph: onnx.GraphProto, tensors: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Replace DequantizeLinear of constants (e.g. INT4 weights of an exported model) by float constants.

    TVM's importer rejects blocked DequantizeLinear; folded, a quantized model imports like a float one.
    Returns the remaining nodes; folded values are added to ``tensors``.
    """
    nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(name in tensors for name in node.input if name):
            values = [numpy_helper.to_array(tensors[name]) if name else None for name in node.input]
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            value = _dequantize(
                values[0],
                values[1].astype(np.float32),
                values[2] if len(values) > 2 else None,
                attributes.get("axis", 1) % max(values[0].ndim, 1),
                attributes.get("block_size", 0),
            )
            tensors[node.output[0]] = numpy_helper.from_array(value, node.output[0])
        else:
            nodes.append(node)
    return nodes


def _weights_as_only_initializers(model: onnx.ModelProto) -> list[str]:
    """Float Gemm/MatMul/Conv weights and other float tensors of ``LARGE_CONSTANT_BYTES`` or more (a
    decoder's embedding table, rotary tables) become initializers; every other constant a Constant node.

    Returns what changed."""
    graph = model.graph
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = _constant_value(node)
    before = len(graph.node)
    nodes = _fold_constant_dequantize(graph, tensors)
    folded = before - len(nodes)
    nodes = [node for node in nodes if node.op_type != "Constant"]
    consumers = {node.input[1] for node in nodes if node.op_type in ("Gemm", "MatMul", "Conv") and len(node.input) > 1}
    weights = [
        name
        for name in tensors
        if name in consumers and tensors[name].data_type == onnx.TensorProto.FLOAT and len(tensors[name].dims) >= 2
    ]
    large = [name for name, tensor in tensors.items() if name not in weights and _is_large_float(tensor)]
    weights += large
    # A subgraph reads the outer scope by name: what its nodes read is used too.
    used = {name for node in [*nodes, *nested_nodes(graph)] for name in node.input} | {o.name for o in graph.output}
    constants = [
        helper.make_node("Constant", [], [name], name=f"{name}/constant", value=tensor)
        for name, tensor in tensors.items()
        if name not in weights and name in used
    ]
    # Removed and added one by one: copying a weight message would serialize it, which fails past 2 GB.
    kept_names = set(weights)
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in kept_names:
            del graph.initializer[index]
    kept = {init.name for init in graph.initializer}
    for name in weights:
        if name not in kept:
            graph.initializer.add().CopyFrom(tensors[name])
    del graph.node[:]
    graph.node.extend(constants + nodes)
    layer_weights = len(weights) - len(large)
    changes = [f"{layer_weights} Gemm/MatMul/Conv weights kept as parameters, {len(constants)} other constants inlined"]
    if large:
        listed = ", ".join(large[:3]) + (", ..." if len(large) > 3 else "")
        changes.append(f"{len(large)} other float tensors of 1 MiB or more kept as parameters: {listed}")
    nested = [n.name or n.output[0] for n in nested_nodes(graph) if n.op_type in ("Gemm", "MatMul", "Conv")]
    if nested:
        listed = ", ".join(nested[:5]) + (", ..." if len(nested) > 5 else "")
        changes.append(f"{len(nested)} Gemm/MatMul/Conv layers inside If / Loop subgraphs stay fp32: {listed}")
    if folded:
        changes.insert(0, f"{folded} DequantizeLinear nodes of constants folded into float weights")
    return changes


def _is_large_float(tensor: onnx.TensorProto) -> bool:
    """A float tensor of ``LARGE_CONSTANT_BYTES`` or more: data (a table), never a shape or an index."""
    if tensor.data_type not in _FLOAT_TYPES:
        return False
    return int(np.prod(tensor.dims)) * _FLOAT_TYPES[tensor.data_type] >= LARGE_CONSTANT_BYTES


def _repair_folded_nodes(model: onnx.ModelProto) -> None:
    """What onnxscript's rewrite of sequence ops leaves for the model's opset to hold, in place:
    ``ConcatFromSequence(new_axis=1)`` becomes an ``Unsqueeze`` whose axes are a 0-d constant (TVM's
    importer needs 1-D axes), ``SplitToSequence`` a ``Split`` with ``num_outputs``, an attribute
    from opset 18 on (before it: the sizes as an input, computed here from the inferred shape)."""
    constants = {node.output[0]: node.attribute[0].t for node in model.graph.node if node.op_type == "Constant"}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    shapes = {vi.name: value_info_shape(vi) for vi in [*model.graph.value_info, *model.graph.input]}
    for node in list(model.graph.node):
        if node.op_type in ("Unsqueeze", "Squeeze") and len(node.input) > 1 and node.input[1] in constants:
            axes = constants[node.input[1]]
            if not axes.dims:
                axes.dims.append(1)
        elif node.op_type == "Split" and opset < 18:
            _split_sizes_as_input(model, node, shapes.get(node.input[0]))


def _split_sizes_as_input(model: onnx.ModelProto, node: onnx.NodeProto, shape: list | None) -> None:
    """A ``Split`` with opset 18's ``num_outputs`` (equal chunks of ceil(dim / n), the last smaller)
    given its sizes as the input earlier opsets read instead, when the split dimension is known."""
    count = next((a for a in node.attribute if a.name == "num_outputs"), None)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    dim = shape[axis] if count is not None and shape and -len(shape) <= axis < len(shape) else None
    if not isinstance(dim, int) or len(node.input) > 1:
        return
    chunk = -(-dim // count.i)
    sizes = np.array([min(chunk, dim - i * chunk) for i in range(count.i)], np.int64)
    name = f"{node.output[0]}/split_sizes"
    model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=numpy_helper.from_array(sizes, name)))
    node.input.append(name)
    node.attribute.remove(count)


MASK_SENTINEL = 1e30


MASK_VALUE = 1e4


def _clamp_mask_constants(model: onnx.ModelProto) -> list[str]:
    """Step 5 of the module docstring, on the Constant nodes left by step 4, kept only if onnxruntime
    computes the same outputs with and without it. Returns what changed, or why nothing did."""
    clamps = []  # (the constant's tensor, its clamped value, what changed)
    for node in model.graph.node:
        tensor = node.attribute[0].t if node.op_type == "Constant" else None
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(tensor)
        sentinels = np.abs(value) >= MASK_SENTINEL
        if sentinels.any():
            extreme = value[sentinels][np.argmax(np.abs(value[sentinels]))]
            clamped = np.where(sentinels, np.sign(value) * MASK_VALUE, value).astype(np.float32)
            note = f"constant '{node.output[0]}': {int(sentinels.sum())} mask values (up to {extreme:.3g}) "
            clamps.append(
                (tensor, numpy_helper.from_array(clamped, tensor.name), note + f"clamped to +-{MASK_VALUE:g}")
            )
    if not clamps:
        return []
    # Both variants run as skeletons sharing one copy of the weights: no serialized model, whatever its size.
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    before = skeleton(model, inline_elements=-1)
    originals = [onnx.TensorProto.FromString(tensor.SerializeToString()) for tensor, _, _ in clamps]
    for tensor, clamped, _ in clamps:
        tensor.CopyFrom(clamped)
    inputs = [tensor_info(vi) for vi in graph_inputs(model)]
    difference = _output_difference(before, skeleton(model, inline_elements=-1), weights, inputs)
    if difference is None:
        return [note for _, _, note in clamps]
    for (tensor, _, _), original in zip(clamps, originals, strict=True):
        tensor.CopyFrom(original)
    return [f"{len(clamps)} mask constant(s) kept as they are: clamping them {difference}"]


def _output_difference(
    model: onnx.ModelProto,
    changed: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    inputs: Sequence[TensorInfo],
    seeds: Sequence[int] = (0, 1),
) -> str | None:
    """How ``changed`` computes other outputs than ``model`` (skeletons taking ``weights``) in onnxruntime,
    bit for bit, on seeded random ``inputs`` (:func:`random_inputs`); None if it computes the same."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = [o.name for o in model.graph.output]
    try:  # the weights fed as inputs: onnxruntime reads them in place, where initializers would be copied
        sessions = [
            ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in (model, changed)
        ]
        for seed in seeds:
            feed = random_inputs(inputs, seed) | weights
            for name, before, after in zip(outputs, *(s.run(outputs, feed) for s in sessions), strict=True):
                if not np.array_equal(before, after, equal_nan=True):
                    delta = np.abs(before.astype(np.float64) - after.astype(np.float64))
                    return f"changes output '{name}' in onnxruntime (by up to {np.nanmax(delta):.3g})"
    except Exception as error:  # noqa: BLE001 - any failure means the rewrite is unproven
        return f"could not be verified in onnxruntime ({str(error).strip().splitlines()[0][:200]})"
    return None


_FLOAT8 = {value for name, value in onnx.TensorProto.DataType.items() if name.startswith("FLOAT8")}


def _float8_warning(model: onnx.ModelProto) -> list[str]:
    """A warning where the model holds float8 tensors: TVM 0.27 converts values below float8's smallest
    normal number (2^-6 in e4m3, 2^-14 in e5m2) wrongly, to and from float32, even exact ones."""
    graph = model.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    names = [vi.name for vi in typed if vi.type.tensor_type.elem_type in _FLOAT8]
    names += [
        node.output[0]
        for node in [*graph.node, *nested_nodes(graph)]
        if node.op_type == "Cast" and any(a.name == "to" and a.i in _FLOAT8 for a in node.attribute)
    ]
    names = list(dict.fromkeys(names))
    if not names:
        return []
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return [
        f"warning: float8 tensors ({listed}): TVM converts float8 subnormals wrongly (magnitudes below "
        "2^-6 in e4m3, 2^-14 in e5m2); such values will differ from onnxruntime"
    ]


_IMPORTED_DOMAINS = ("", "ai.onnx", "com.microsoft")  # whose ops TVM's importer converts by name


# Layers another tool has quantized already: integer kernels, or 4-bit / 8-bit weight formats.
_QUANTIZED_LAYER_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "GatherBlockQuantized",
    }
)


def _is_quantized(node: onnx.NodeProto) -> bool:
    return node.op_type in _QUANTIZED_LAYER_OPS or node.op_type.startswith("QLinear")


def _check_supported_ops(model: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"Constant", "If"}
    unsupported: dict[str, list[str]] = {}
    quantized = set()
    for node in [*model.graph.node, *nested_nodes(model.graph)]:
        if node.op_type not in supported or node.domain not in _IMPORTED_DOMAINS:
            op = f"{node.domain + '.' if node.domain else ''}{node.op_type}"
            unsupported.setdefault(op, []).append(node.name or node.output[0])
            if _is_quantized(node):
                quantized.add(op)
    if unsupported:
        listed = "; ".join(
            f"{op} (nodes: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            for op, names in sorted(unsupported.items())
        )
        hint = (
            f". The model is already quantized ({', '.join(sorted(quantized))}): lpbq_tvm quantizes float "
            "models, so give it the float model this one was made from"
            if quantized
            else ""
        )
        raise ModelImportError(f"TVM's ONNX importer does not support: {listed}{hint}")


def _quantized_layers(model: onnx.ModelProto) -> list[str]:
    """A note on the layers another tool quantized (that TVM imports, e.g. ``MatMulInteger``): they run
    as the model defines them, in integer arithmetic, and are no LPBQ candidates."""
    layers: dict[str, list[str]] = {}
    for node in [*model.graph.node, *nested_nodes(model.graph)]:
        if _is_quantized(node):
            layers.setdefault(node.op_type, []).append(node.name or node.output[0])
    if not layers:
        return []
    listed = "; ".join(
        f"{op}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" for op, names in layers.items()
    )
    count = sum(len(names) for names in layers.values())
    return [f"{count} layers already quantized by another tool run as the model defines them, not LPBQ ({listed})"]
