"""LowerLPBQ: replace every encoded layer with a kernel call that reads 4-bit packed weights.

Match: the layers of AnnotateLPBQ (``matmul`` with a plain or permuted weight, ``nn.conv1d`` /
``nn.conv2d``), optionally followed by ``add(layer, bias)`` with a bias that varies only along the
output channels, whose weight has an entry in ``"lpbq.encodings"`` (written by EncodeLPBQ).

Rewrite: ``R.call_tir`` to a generic kernel of :mod:`lpbq_tvm.kernels.generic` (``lpbq_dense`` /
``lpbq_conv``, marked opaque so fusion leaves it alone) taking ``x``, the packed ``q`` and ``k - 1`` nibbles,
the fp32 per-channel scale ``s`` and, when the graph adds one, the bias (docs/design.md §3). For a
parameter weight the fp32 parameter is removed once unused and three parameters
``<weight>.lpbq_q`` (uint8), ``<weight>.lpbq_k`` (uint8), ``<weight>.lpbq_s`` (float32) are
appended, their values added to the ``"params"`` attribute; a constant weight becomes packed
constants. The function records ``"lpbq.lowered"`` (weight key -> node, mode, packed parameter
names) and drops ``"lpbq.encodings"``: the packed arrays are now the only copy of the weight.
Layers without an encoding stay fp32.

Modes (docs/design.md §3): ``"weight-only"`` (fp32 activations; ``y = s[c] · Σ x · float(q · k)``),
``"w4a8"`` / ``"w4a16"`` (activation quantized per tensor to uint8 / uint16 from its calibrated
range in ``"lpbq.activation_ranges"``, integer accumulation in int32 / int64, fp32 epilogue),
``"w4a8-dynamic"`` (dense layers only: uint8 with an encoding per row computed at run time from the
row's range, no calibration; a scheduled kernel gets them from a ``lpbq_row_encodings`` call before it).
With ``requantize_outputs=True`` (HTP semantics) each integer layer's output is also quantized
to its own calibrated encoding and dequantized (QDQ); a bias is then fused only where the ONNX
node itself adds it (``has_bias`` of ``"lpbq.onnx_nodes"``), so requantization sees what the
ONNX tensor holds, and a Gemm's product is first requantized to its ``"pre_bias"`` range, as in
the QNN export's ``MatMul -> Q -> DQ -> Add(bias) -> Q -> DQ``.

With a ``kernels`` provider (a target's, :mod:`lpbq_tvm.kernels.interface`), each dense layer with
fp32 activations is first offered to it as a :class:`~lpbq_tvm.kernels.interface.DenseLayer` (a
matmul's leading activation axes flattened into rows: a transformer's ``[batch, seq, hidden]``);
so is each ungrouped NCW / NCHW / NHWC convolution, as a dense layer over its tap-major im2col
columns (a 1x1 stride-1 conv's columns are its pixels: no im2col, at most two transposes). Where
the provider answers with a kernel, the layer calls it with the weight arrays it asked for, as
parameters ``<weight>.<suffix>``; otherwise the generic kernel runs.

Run it after EncodeLPBQ, before ``tvm.compile``.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.dpl import rewrite_call

from lpbq_tvm.attrs import (
    ACTIVATION_BITWIDTH,
    ACTIVATION_RANGES_ATTR,
    ENCODINGS_ATTR,
    LOWERED_ATTR,
    OUTPUT_ACTIVATION_BITWIDTH,
    PARAMS_ATTR,
    WEIGHTS_ATTR,
    function_attr,
    num_inputs,
)
from lpbq_tvm.calibration import RowwiseEncoding, activation_encoding
from lpbq_tvm.encoder import LPBQEncoding, side_by_side
from lpbq_tvm.kernels.generic import conv_kernel, dense_kernel, im2col, tap_major, transposed_around
from lpbq_tvm.kernels.interface import DenseLayer, IntegerArithmetic, KernelProvider
from lpbq_tvm.modes import activation_bits, is_dynamic, needs_calibration
from lpbq_tvm.packing import pack
from lpbq_tvm.passes._layers import (
    Candidate,
    LayerPatterns,
    match_candidate,
    read_counts,
    weight_keys,
    weight_parts,
)
from lpbq_tvm.passes.encode_lpbq import read_encodings

__all__ = ["LowerLPBQ", "attach_activation_ranges"]

_PACKED_SUFFIXES = ("lpbq_q", "lpbq_k", "lpbq_s")


def _is_channel_bias(bias: relax.Expr, output: relax.Expr, channel_axis: int) -> bool:
    """Whether ``add(output, bias)`` adds a float32 value that varies along the channel axis only."""
    bias_shape, out_shape = bias.ty.shape, output.ty.shape
    if bias_shape is None or out_shape is None or len(bias_shape) > len(out_shape) or bias.ty.dtype != "float32":
        return False
    try:
        dims = [int(d) for d in bias_shape]
        out_dims = [int(d) for d in out_shape]
    except TypeError:  # symbolic shapes
        return False
    channel_axis %= len(out_dims)
    aligned = [1] * (len(out_dims) - len(dims)) + dims
    others = [d for axis, d in enumerate(aligned) if axis != channel_axis]
    return aligned[channel_axis] in (1, out_dims[channel_axis]) and all(d == 1 for d in others)


def _shared_values(func: relax.Function) -> list[relax.Expr]:
    """Values of bindings whose variable is read more than once."""
    reads = read_counts(func)
    return [binding.value for block in func.body.blocks for binding in block.bindings if reads[binding.var] > 1]


def attach_activation_ranges(
    mod: tvm.IRModule, ranges: dict[str, dict[str, tuple[float, float]]], function: str = "main"
) -> tvm.IRModule:
    """Record calibrated activation ranges, weight key -> {"input": (min, max), "output": (min, max)}."""
    values = {
        key: {where: [float(v) for v in bounds] for where, bounds in entry.items()} for key, entry in ranges.items()
    }
    mod = mod.clone()
    gvar = mod.get_global_var(function)
    mod.update_func(gvar, mod[gvar].with_attr(ACTIVATION_RANGES_ATTR, values))
    return mod


class _Lowering:
    """The state of lowering one function: its encodings and the packed parameters it gains."""

    def __init__(
        self, func: relax.Function, mode: str, requantize_outputs: bool, kernels: KernelProvider | None
    ) -> None:
        self.func = func
        self.mode = mode
        self.requantize_outputs = requantize_outputs
        self.ranges = function_attr(func, ACTIVATION_RANGES_ATTR)
        self.annotations = function_attr(func, WEIGHTS_ATTR)
        self.encodings: dict[str, LPBQEncoding] = read_encodings(func)
        self.kernels = kernels
        self.packed: dict[str, tuple[list[np.ndarray], list[relax.Expr]]] = {}
        self.parts: dict[str, list[str]] = {}  # a merged layer's key -> its layers' keys
        self.merged_into: dict[str, str] = {}  # a merged layer's part -> the layer's key
        self.generic: list[relax.GlobalVar] = []

    def key_of(self, weight: relax.Expr) -> str | None:
        """The key of an encoded ``weight``, None if it has no encoding. Weights side by side
        (MergeSiblingLayers) get one key, ``<w1>+<w2>+…``, with their encodings side by side, the
        first layer's annotation (the pass merges only layers whose annotations agree) and input range;
        the parts' own encodings are dropped (a large model's codes are not held twice), so a weight
        merged into one layer cannot also be lowered alone (the pass merges only weights read once)."""
        keys = weight_keys(weight, self.annotations)
        if keys is None:
            return None
        key = "+".join(keys)
        if key in self.encodings:
            return key
        for part in keys:
            if part in self.merged_into:
                msg = (
                    f"weight {part} is lowered within the merged layer {self.merged_into[part]}; another layer "
                    "reading it needs an encoding of its own (MergeSiblingLayers merges only weights read once)"
                )
                raise ValueError(msg)
        if len(keys) == 1 or any(part not in self.encodings for part in keys):
            return None
        self.encodings[key] = side_by_side([self.encodings.pop(part) for part in keys])
        self.parts[key] = keys
        self.merged_into.update(dict.fromkeys(keys, key))
        nodes = ", ".join(str(self.annotations[part]["node"]) for part in keys)
        self.annotations[key] = {**self.annotations[keys[0]], "node": nodes}
        if keys[0] in self.ranges:
            self.ranges[key] = self.ranges[keys[0]]
        return key

    def weight_args(self, key: str, weight: relax.Expr, arrays: dict[str, np.ndarray]) -> list[relax.Expr]:
        """Operands for ``arrays`` (suffix -> value): new parameters ``<key>.<suffix>``, or constants."""
        if key not in self.packed:
            if all(isinstance(part, relax.Var) for part in weight_parts(weight) or [weight]):
                args = [
                    relax.Var(f"{key}.{suffix}", relax.TensorType(array.shape, str(array.dtype)))
                    for suffix, array in arrays.items()
                ]
            else:
                args = [relax.const(array) for array in arrays.values()]
            self.packed[key] = (list(arrays.values()), args)
        return self.packed[key][1]

    def scheduled_dense(
        self,
        bb: relax.BlockBuilder,
        key: str,
        x: relax.Expr,
        x_shape: tuple[int, ...],
        weight: relax.Expr,
        bias: relax.Expr | None,
        integer: IntegerArithmetic | None,
        encoding: LPBQEncoding | None = None,
    ) -> relax.Expr | None:
        """A call of the kernel the provider chooses for this dense layer (2-D fp32 activations ``x`` of
        ``x_shape``, a bias of one value per channel, the weight as ``encoding``, by default the layer's
        own), or None where it has none."""
        encoding = encoding or self.encodings[key]
        if self.kernels is None or len(x_shape) != 2:
            return None
        rows, depth, channels = int(x_shape[0]), int(x_shape[1]), encoding.num_channels
        if bias is not None and int(np.prod([int(d) for d in bias.ty.shape])) != channels:
            return None
        choice = self.kernels(DenseLayer(rows, depth, encoding, bias is not None, integer))
        if choice is None:
            return None
        args = [x, *self.weight_args(key, weight, choice.weights)]
        if choice.row_encodings is not None:
            rows_in = te.placeholder((rows, depth), "float32", "x")
            func = te.create_prim_func([rows_in, *choice.row_encodings(rows_in)]).without_attr("global_symbol")
            gvar = bb.add_func(func, "lpbq_row_encodings")  # (one per shape: equal functions are added once)
            encodings = [relax.TensorType((rows,), "float32"), relax.TensorType((rows,), "int32")]
            row_encodings = relax.call_tir(gvar, [x], encodings)
            args[1:1] = [relax.TupleGetItem(row_encodings, 0), relax.TupleGetItem(row_encodings, 1)]
        args += [relax.op.reshape(bias, [channels])] if bias is not None else []
        gvar = bb.add_func(choice.func.without_attr("global_symbol"), choice.name)  # named by its GlobalVar
        return relax.call_tir(gvar, args, relax.TensorType((rows, channels), "float32"))

    def conv_as_dense(
        self, bb: relax.BlockBuilder, key: str, candidate: Candidate, bias, integer: IntegerArithmetic | None
    ) -> relax.Expr | None:
        """An ungrouped conv (NCW, NCHW or NHWC) as a scheduled dense kernel over its im2col columns,
        where :meth:`scheduled_dense` finds one: ``[N·prod(O), R·C]`` columns (R kernel taps, tap-major
        so each row copies whole channel vectors), the weight in the same order (``tap_major``), then the
        output in the conv's layout. A 1x1 stride-1 unpadded conv's columns are its pixels: the input
        itself in NHWC, a transpose otherwise."""
        attrs = candidate.call.attrs
        layout = str(attrs.data_layout)
        if self.kernels is None or layout not in ("NCHW", "NCW", "NHWC") or int(attrs.groups) != 1:
            return None
        if candidate.x.ty.dtype != "float32":
            return None
        channels_last = candidate.channels_last
        try:
            shape = [int(d) for d in candidate.x.ty.shape]
            out_shape = [int(d) for d in candidate.call.ty.shape]
        except TypeError:  # symbolic shapes
            return None
        n, c = (shape[0], shape[-1]) if channels_last else shape[:2]
        out_spatial = out_shape[1:-1] if channels_last else out_shape[2:]
        encoding = tap_major(self.encodings[key])
        kernel = list(self.encodings[key].shape[2:])
        strides, dilation = [int(v) for v in attrs.strides], [int(v) for v in attrs.dilation]
        padding = [int(v) for v in attrs.padding]
        rows, depth, rank = n * int(np.prod(out_spatial)), c * int(np.prod(kernel)), len(out_spatial)
        if all(v == 1 for v in [*kernel, *strides]) and not any(padding):
            pixels = candidate.x if channels_last else relax.op.permute_dims(candidate.x, [0, *range(2, rank + 2), 1])
        else:
            columns_of = functools.partial(
                im2col,
                kernel=kernel,
                strides=strides,
                padding=padding[:rank],
                dilation=dilation,
                out_spatial=out_spatial,
                channels_last=channels_last,
            )
            pixels = bb.call_te(columns_of, candidate.x, primfunc_name_hint="lpbq_im2col")
        columns = relax.op.reshape(pixels, [rows, depth])
        dense = self.scheduled_dense(bb, key, columns, (rows, depth), candidate.weight, bias, integer, encoding)
        if dense is None:
            return None
        outputs = relax.op.reshape(dense, [n, *out_spatial, encoding.num_channels])
        return outputs if channels_last else relax.op.permute_dims(outputs, [0, rank + 1, *range(1, rank + 1)])

    def integer_arithmetic(self, key: str, node: str) -> IntegerArithmetic | None:
        """The integer settings of layer ``key`` in this mode (None in weight-only mode): encodings of the
        mode's width, or of the width of the layer's input / output tensor (``activation_bitwidth`` /
        ``output_activation_bitwidth``, :meth:`~lpbq_tvm.QuantizationSimModel.set_activation_bitwidth`)."""
        bitwidth = activation_bits(self.mode)
        if bitwidth is None:
            return None
        annotation = self.annotations[key]
        own_input, own_output = annotation.get(ACTIVATION_BITWIDTH), annotation.get(OUTPUT_ACTIVATION_BITWIDTH)
        if is_dynamic(self.mode):
            if own_input is not None or own_output is not None:
                msg = (
                    f"{node}: its activations have their own width (set_activation_bitwidth), which mode "
                    f"{self.mode} cannot keep: it encodes each row at run time"
                )
                raise ValueError(msg)
            return IntegerArithmetic(RowwiseEncoding())
        input_bits = bitwidth if own_input is None else int(own_input)
        output_bits = bitwidth if own_output is None else int(own_output)
        ranges = self.ranges.get(key)
        if ranges is None or "input" not in ranges or (self.requantize_outputs and "output" not in ranges):
            msg = (
                f"{node}: mode {self.mode} needs the calibrated activation range of this layer's input"
                f"{' and output' if self.requantize_outputs else ''}; run calibration "
                "(sim.compute_encodings with a callback) or attach_activation_ranges first"
            )
            raise ValueError(msg)
        input_encoding = activation_encoding(*ranges["input"], input_bits)
        if not self.requantize_outputs:
            return IntegerArithmetic(input_encoding)
        pre_bias = None
        matmul_plus_add = not self.encodings[key].is_per_channel  # exports keep int8 Gemms whole
        if str(annotation.get("op_type")) == "Gemm" and bool(annotation.get("has_bias", True)) and matmul_plus_add:
            if "pre_bias" not in ranges:
                msg = f"{node}: requantizing a Gemm with bias needs the calibrated range before the bias add"
                raise ValueError(msg)
            pre_bias = activation_encoding(*ranges["pre_bias"], output_bits)
        return IntegerArithmetic(input_encoding, activation_encoding(*ranges["output"], output_bits), pre_bias)

    def lower(
        self, bb: relax.BlockBuilder, candidate: Candidate, bias: relax.Expr | None, fallback: relax.Expr
    ) -> relax.Expr:
        """The kernel call replacing ``candidate`` (+ ``bias``); ``fallback`` when it has no encoding."""
        key = self.key_of(candidate.weight)
        if key is None:
            return fallback
        annotation = self.annotations[key]
        if bias is not None and self.requantize_outputs and not bool(annotation.get("has_bias", True)):
            return fallback  # the ONNX node ends before the bias add: requantize before it
        encoding = self.encodings[key]
        integer = self.integer_arithmetic(key, str(annotation["node"]))
        if integer is not None and integer.rowwise and candidate.kind != "dense":
            msg = (
                f"{annotation['node']}: mode {self.mode} quantizes the rows of dense layers (MatMul, Gemm); "
                f"a convolution's input (shape {[int(d) for d in candidate.x.ty.shape]}) takes one calibrated "
                "encoding: compile it in mode w4a8, or exclude it from LPBQ"
            )
            raise ValueError(msg)
        if candidate.kind == "dense":
            shape = tuple(int(d) for d in candidate.x.ty.shape) if candidate.x.ty.shape is not None else ()
            if candidate.x.ty.dtype == "float32" and len(shape) >= 2:
                rows, rows_shape = _as_rows(candidate.x, shape)
                scheduled = self.scheduled_dense(bb, key, rows, rows_shape, candidate.weight, bias, integer)
                if scheduled is not None:  # back to the leading axes of x
                    return relax.op.reshape(scheduled, [*shape[:-1], encoding.num_channels])
        elif (scheduled := self.conv_as_dense(bb, key, candidate, bias, integer)) is not None:
            return scheduled
        packed = pack(encoding)
        q, k, s = self.weight_args(
            key, candidate.weight, dict(zip(_PACKED_SUFFIXES, (packed.q, packed.k, packed.scale), strict=True))
        )
        channels_last = candidate.channels_last
        operands = [candidate.x, q, k, s] + ([bias] if bias is not None else [])
        if candidate.kind == "dense":
            kernel, name = (
                functools.partial(
                    dense_kernel, block_size=encoding.block_size, code_bits=packed.code_bits, integer=integer
                ),
                "lpbq_dense",
            )
        else:
            attrs = candidate.call.attrs
            kernel = functools.partial(
                conv_kernel,
                block_size=encoding.block_size,
                weight_shape=encoding.shape,
                strides=[int(v) for v in attrs.strides],
                padding=[int(v) for v in attrs.padding],
                dilation=[int(v) for v in attrs.dilation],
                groups=int(attrs.groups),
                data_layout="NCHW" if channels_last else str(attrs.data_layout),
                code_bits=packed.code_bits,
                integer=integer,
            )
            if channels_last:
                kernel = functools.partial(transposed_around, kernel)
            name = "lpbq_conv"
        # Non-tensor settings are bound with partial: call_te would try to convert them to TE.
        call = bb.call_te(kernel, *operands, primfunc_name_hint=name)
        self.generic.append(call.args[0])
        return call


def _as_rows(x: relax.Expr, shape: tuple[int, ...]) -> tuple[relax.Expr, tuple[int, int]]:
    """``x`` of a matmul as the 2-D rows of a dense layer: its leading axes flattened (a transformer's
    ``[batch, seq, hidden]`` is ``batch · seq`` rows), and that shape."""
    if len(shape) == 2:
        return x, shape
    rows = (int(np.prod(shape[:-1])), shape[-1])
    return relax.op.reshape(x, list(rows)), rows


@tvm.transform.module_pass(opt_level=0, name="LowerLPBQ")
class LowerLPBQ:
    """Lower encoded LPBQ layers to packed-weight kernels; see the module docstring."""

    def __init__(
        self, mode: str = "weight-only", requantize_outputs: bool = False, kernels: KernelProvider | None = None
    ) -> None:
        activation_bits(mode)  # (an unknown mode is an error naming the modes)
        if requantize_outputs and not needs_calibration(mode):
            msg = f"requantize_outputs needs a calibrated integer mode (w4a8, w4a16), not {mode!r}"
            raise ValueError(msg)
        self.mode = mode
        self.requantize_outputs = requantize_outputs
        self.kernels = kernels
        self.patterns = LayerPatterns(merged=True)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        encoded = [
            (gvar, func)
            for gvar, func in mod.functions_items()
            if isinstance(func, relax.Function) and function_attr(func, ENCODINGS_ATTR)
        ]
        if not encoded:
            return mod
        bb = relax.BlockBuilder(mod.clone())
        generic = []
        for gvar, func in encoded:
            lowering = _Lowering(func, self.mode, self.requantize_outputs, self.kernels)
            bb.update_func(gvar, self._rewrite(bb, func, lowering))
            generic += lowering.generic
        lowered = bb.get()
        for kernel in generic:
            lowered.update_func(kernel, lowered[kernel].with_attr("op_pattern", 8))
        return relax.transform.DeadCodeElimination()(lowered)

    def _rewrite(self, bb: relax.BlockBuilder, func: relax.Function, lowering: _Lowering) -> relax.Function:
        patterns = self.patterns

        shared = _shared_values(func)

        def with_bias(call: relax.Call, matchings: dict) -> relax.Expr:
            candidate = match_candidate(patterns, matchings, func)
            if candidate is None:
                return call
            channel_axis = -1 if candidate.kind == "dense" or candidate.channels_last else 1
            bias = matchings[patterns.bias]
            if not _is_channel_bias(bias, call, channel_axis) or any(candidate.call.same_as(v) for v in shared):
                return call  # not a bias; or the layer's output is used elsewhere too (hardswish's x + 3)
            return lowering.lower(bb, candidate, bias, fallback=call)

        def without_bias(call: relax.Call, matchings: dict) -> relax.Expr:
            candidate = match_candidate(patterns, matchings, func)
            if candidate is None:
                return call
            return lowering.lower(bb, candidate, None, fallback=call)

        # A layer lowered with its bias add leaves its own binding dead: drop it, so that the second
        # pass does not lower it again and the fp32 weight it read counts as unused.
        body_func = relax.analysis.remove_all_unused(rewrite_call(patterns.with_bias, with_bias, func))
        body_func = rewrite_call(patterns.layer, without_bias, body_func)
        return self._replace_params(body_func, lowering)

    @staticmethod
    def _replace_params(func: relax.Function, lowering: _Lowering) -> relax.Function:
        """Drop fp32 weight parameters no longer used, append the packed ones and their values."""
        used = {var.name for var in relax.analysis.free_vars(func.body)}
        num_input = num_inputs(func)
        values = list(func.attrs[PARAMS_ATTR]) if PARAMS_ATTR in func.attrs else None
        params, kept_values = list(func.params[:num_input]), []
        replaced = {part for key in lowering.packed for part in lowering.parts.get(key, [key])}
        for index, param in enumerate(func.params[num_input:]):
            if param.name in replaced and param.name not in used:
                continue
            params.append(param)
            if values is not None:
                kept_values.append(values[index])
        lowered = {}
        for key, (arrays, args) in lowering.packed.items():
            as_params = isinstance(args[0], relax.Var)
            for part in lowering.parts.get(key, [key]):
                annotation = lowering.annotations[part]
                lowered[part] = {
                    "node": annotation["node"],
                    "op_type": annotation["op_type"],
                    "mode": lowering.mode,
                    "requantized": lowering.requantize_outputs,
                }
                if as_params:
                    lowered[part]["params"] = [arg.name for arg in args]
            if as_params:
                params += args
                kept_values += [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        attrs = {k: v for k, v in func.attrs.items() if k not in (ENCODINGS_ATTR, PARAMS_ATTR)}
        attrs[LOWERED_ATTR] = lowered
        if values is not None:
            attrs[PARAMS_ATTR] = kept_values
        new_func = relax.Function(params, func.body, func.ret_ty, func.is_pure, None, func.span)
        for name, value in attrs.items():
            new_func = new_func.with_attr(name, value)
        return new_func
