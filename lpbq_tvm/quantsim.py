"""The AIMET-style workflow: a quantization simulation of an ONNX model with LPBQ weights.

Names and arguments follow aimet_onnx so its users feel at home::

    sim = QuantizationSimModel("model.onnx")
    set_grouped_blockwise_quantization_for_weights(sim, op_types=("Gemm", "MatMul", "Conv"),
        bitwidth=4, decompressed_bw=8, block_size=64)
    sim.compute_encodings(callback, args)    # encodes the weights, then runs callback(sim, args)
    outputs = sim.run({"x": x})              # fp32 model with LPBQ-dequantized weights
    sim.export("out/", "model")              # model.onnx + model.encodings (AIMET 1.0.0)
    compiled = lpbq_tvm.compile(sim)         # TVM executable with 4-bit packed weight kernels

Under the hood ``sim`` holds the Relax import of the prepared model (:mod:`lpbq_tvm.frontend`);
each ``set_grouped_blockwise_quantization_for_weights`` call applies ``AnnotateLPBQ`` and
``compute_encodings`` applies ``EncodeLPBQ``. ``run`` executes the prepared ONNX model with the
dequantized weights in onnxruntime, an implementation independent of the TVM kernels.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lpbq_tvm.attrs import (
    ACTIVATION_BITWIDTH,
    ACTIVATION_RANGES_ATTR,
    ENCODINGS_ATTR,
    OUTPUT_ACTIVATION_BITWIDTH,
    SKIPPED_ATTR,
    WEIGHTS_ATTR,
    function_attr,
)
from lpbq_tvm.calibration import ActivationEncoding, ChannelEnergyObserver, RangeObserver, activation_encoding
from lpbq_tvm.encoder import LPBQConfig, LPBQEncoding
from lpbq_tvm.frontend import ImportedModel, import_onnx, random_inputs
from lpbq_tvm.io import atomic_write
from lpbq_tvm.onnx_layers import activation_tensors
from lpbq_tvm.packing import bits_per_weight

__all__ = ["QuantizationSimModel", "LayerReport", "set_grouped_blockwise_quantization_for_weights"]

logger = logging.getLogger(__name__)
UNSEEN_LISTED = 6  # tensors the warning about uncalibrated tensors names (a decoder has 2 per layer)


class _Shifted:
    """An observer that sees ``value + offset`` (e.g. a Gemm output minus its bias)."""

    def __init__(self, observer: RangeObserver, offset: np.ndarray) -> None:
        self.observer, self.offset = observer, offset

    def update(self, value: np.ndarray) -> None:
        self.observer.update(value + self.offset)


@dataclass(frozen=True)
class LayerReport:
    """One Gemm / MatMul / Conv weight: what happened to it and how good its encoding is."""

    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    status: str  # "lpbq", "int8" (per channel, a mixed-precision choice) or "skipped"
    reason: str = ""
    block_size: int | None = None
    sqnr_db: float | None = None
    bits_per_weight: float | None = None
    k_histogram: tuple[int, ...] = ()  # counts of k = 1 .. 2**(dbw - bw)
    dead_channels: int = 0  # all-zero output channels (they get the minimum scale, as in AIMET)
    encoder: str = ""


class QuantizationSimModel:
    """An ONNX model prepared for LPBQ; see the module docstring."""

    def __init__(
        self,
        model: str | PathLike | onnx.ModelProto,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        quant_scheme: str = "minmax",
        percentile: float = 99.99,
        default_activation_bw: int = 8,
    ) -> None:
        """``quant_scheme`` ("minmax" or "percentile") chooses how activation ranges are calibrated;
        ``default_activation_bw`` (8 or 16) is the activation width of the exported encodings."""
        RangeObserver(quant_scheme, percentile)  # validates both
        activation_encoding(0.0, 1.0, default_activation_bw)  # validates the width
        self._source = model  # what reshaped() imports again at other shapes
        self._imported: ImportedModel = import_onnx(model, input_shapes)
        self._annotated = self._imported.mod
        self._encoded = None
        self._session = None
        self._observers: dict[str, list] | None = None
        self._activation_ranges: dict[str, tuple[float, float]] = {}
        self._budget: dict[str, float] = {}
        self._recorded: list[dict[str, np.ndarray]] | None = None
        self.precision_choice = None  # analysis.PrecisionChoice once a budget has chosen int8 layers
        self.quant_scheme = quant_scheme
        self.percentile = percentile
        self.default_activation_bw = default_activation_bw

    def reshaped(self, input_shapes: Mapping[str, Sequence[int]]) -> QuantizationSimModel:
        """This model imported again at other input shapes, with this simulation's LPBQ configuration,
        encodings and calibrated ranges: what a decoder compiles once per static shape (its prefill and
        its decode step, :mod:`lpbq_tvm.llm`). They are kept per weight and per tensor name, not per
        shape, so they carry over; the new import must hold the same weight layers."""
        other = copy.copy(self)
        other._imported = import_onnx(self._source, input_shapes, shared=self._imported)
        if other._imported.layers.keys() != self._imported.layers.keys():
            differ = sorted(other._imported.layers.keys() ^ self._imported.layers.keys())
            raise ValueError(f"at shapes {dict(input_shapes)} the weight layers differ: {', '.join(differ)}")
        other._annotated = _with_attrs_of(other._imported.mod, self._annotated)
        if self._encoded is not None:
            other._encoded = _with_attrs_of(other._imported.mod, self._encoded)
        other._session, other._observers, other._recorded = None, None, None
        return other

    @property
    def model(self) -> onnx.ModelProto:
        """The prepared fp32 ONNX model (pinned shapes, folded constants) that is quantized, with its weights:
        built on each access (the simulation holds its weights once, as :attr:`weights`)."""
        return self._imported.onnx_model()

    @property
    def graph(self) -> onnx.ModelProto:
        """The prepared model with its weights as typed graph inputs, without their values (cheap to copy)."""
        return self._imported.graph

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The prepared model's weights by name: read-only views of the Relax parameters (no copies)."""
        return self._imported.weights

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded random inputs of the model's shapes: N(0, 1) floats, integers 0..1."""
        return random_inputs(self.inputs, seed)

    @property
    def preparation(self) -> tuple[str, ...]:
        """What graph preparation changed in the model before import, one line each."""
        return self._imported.preparation

    @property
    def layers(self):
        """Every Gemm / MatMul / Conv with a constant weight (``WeightLayer``), by weight name."""
        return self._imported.layers

    @property
    def inputs(self):
        return self._imported.inputs

    @property
    def outputs(self):
        return self._imported.outputs

    @property
    def float_module(self):
        """The Relax import of the prepared fp32 model, before any LPBQ pass."""
        return self._imported.mod

    @property
    def has_encodings(self) -> bool:
        return self._encoded is not None

    @property
    def encoded_module(self):
        """The Relax module after AnnotateLPBQ and EncodeLPBQ (fp32 graph, encodings attached)."""
        self._require_encodings()
        return self._encoded

    def apply_lpbq(
        self,
        config: LPBQConfig,
        op_types: Iterable[str],
        excluded_nodes: Iterable[str] = (),
        strict: bool = False,
    ) -> None:
        """Annotate the selected layers (a later call wins for the op types it selects)."""
        from lpbq_tvm.passes.annotate_lpbq import AnnotateLPBQ

        excluded_nodes = list(excluded_nodes)
        layer_nodes = {layer.node_name for layer in self._imported.layers.values()}
        unknown = sorted(set(excluded_nodes) - layer_nodes)
        if unknown:
            msg = (
                f"excluded_nodes names {', '.join(repr(n) for n in unknown)}, which are not Gemm/MatMul/Conv "
                f"nodes with a constant weight; those are: {', '.join(sorted(layer_nodes))}"
            )
            raise ValueError(msg)
        annotated = AnnotateLPBQ(config, op_types, excluded_nodes, strict)(self._annotated)
        self._check_fits_some_layer(annotated, config, op_types, excluded_nodes)
        self._annotated = annotated
        self.precision_choice = None  # a new configuration: a budget chooses again
        self._encoded = None
        self._session = None
        self._activation_ranges = {}

    def set_precision_budget(
        self,
        target_cosine: float | None = None,
        ratio: float | None = None,
        held_out: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """Have ``compute_encodings(callback, args)`` choose int8 per-channel layers on the data the
        callback runs, so that the model output cosine to fp32 reaches ``target_cosine``, or so that
        ``ratio`` of the weights stay at 4 bits (:func:`lpbq_tvm.analysis.select_precision`; the
        result, with the cosine on ``held_out`` batches if given, is ``sim.precision_choice``). The
        calibration batches are kept in memory for it."""
        if target_cosine is not None and ratio is not None:
            raise ValueError("give one budget: a target cosine (accuracy_budget) or a ratio of weights at 4 bits")
        self._budget = {"target_cosine": target_cosine} if target_cosine is not None else {}
        self._budget |= {"ratio": ratio} if ratio is not None else {}
        if self._budget and held_out:
            self._budget["held_out"] = list(held_out)
        self.precision_choice = None

    def set_int8_per_channel(self, nodes: Iterable[str]) -> None:
        """Keep these LPBQ layers (ONNX node names) at int8 per channel: 8-bit codes, one float scale
        per output channel (``k`` = 1, one block per channel). They run on the same kernels and
        export as AIMET per-channel entries and int8 ``DequantizeLinear``; the rest stay LPBQ.
        Encodings (and calibration) must be computed again afterwards."""
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        for key in self._weight_keys(nodes, "set_int8_per_channel"):
            channels = self._imported.layers[key].input_channels
            weights[key] = {**weights[key], **LPBQConfig.int8_per_channel(channels).as_dict()}
        self._annotated = _with_weights(self._annotated, weights)
        self._encoded, self._session, self._activation_ranges = None, None, {}

    def set_activation_bitwidth(self, nodes: Iterable[str], bitwidth: int) -> None:
        """Have these LPBQ layers (ONNX node names) quantize their input to ``bitwidth`` bits (8 or 16)
        in the static integer modes ``w4a8`` and ``w4a16``, whatever the mode's own width: mixed 8- and
        16-bit activations, as Qualcomm's LLM recipes run a decoder's MLP down projections, whose inputs
        carry values hundreds of times the rest (docs/llm.md). Their kernels follow (W4A16 kernels in
        ``w4a8``). Encodings and calibration stay valid. The width belongs to the input tensor: layers that
        read one tensor (a decoder's q, k and v projections) take it together; every encoding of that
        tensor has it (the AIMET file, the QNN export's Q/DQ, ``htp-sim``, where a layer that writes it
        requantizes its output to it). ``w4a8-dynamic``, an encoding per row, refuses such layers."""
        activation_encoding(0.0, 1.0, bitwidth)  # validates the width
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        keys = self._weight_keys(nodes, "set_activation_bitwidth")
        tensors = self._layer_tensors()
        inputs = {key: source for key, (source, _) in tensors.items()}
        for key in keys:
            sharing = [k for k, tensor in inputs.items() if tensor == inputs[key] and k not in keys]
            mismatched = [k for k in sharing if int(weights[k].get(ACTIVATION_BITWIDTH, 0)) != bitwidth]
            if mismatched:
                others = ", ".join(sorted(str(weights[k]["node"]) for k in mismatched))
                msg = (
                    f"set_activation_bitwidth: {weights[key]['node']} reads {inputs[key]!r} with {others}; "
                    "layers that read one tensor share its width: give them together"
                )
                raise ValueError(msg)
        for key in keys:
            weights[key] = {**weights[key], ACTIVATION_BITWIDTH: bitwidth}
        widths = self._tensor_widths(weights)
        for key, entry in weights.items():  # the layers that write such a tensor requantize to its width
            entry = {name: value for name, value in entry.items() if name != OUTPUT_ACTIVATION_BITWIDTH}
            output = tensors[key][1]
            weights[key] = entry | ({OUTPUT_ACTIVATION_BITWIDTH: widths[output]} if output in widths else {})
        self._annotated = _with_weights(self._annotated, weights)
        if self._encoded is not None:
            self._encoded = _with_weights(self._encoded, weights)

    def _weight_keys(self, nodes: Iterable[str], caller: str) -> list[str]:
        """The weight keys of these LPBQ layers (ONNX node names); an error listing them for any other name."""
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        by_node = {str(entry["node"]): key for key, entry in weights.items()}
        nodes = list(nodes)
        unknown = sorted(set(nodes) - by_node.keys())
        if unknown:
            listed, known = ", ".join(map(repr, unknown)), ", ".join(sorted(by_node))
            raise ValueError(f"{caller}: {listed} are not LPBQ layers; those are: {known}")
        return [by_node[node] for node in nodes]

    def _tensor_widths(self, weights: Mapping[str, Any] | None = None) -> dict[str, int]:
        """The activation tensors of their own width (:meth:`set_activation_bitwidth`) and that width."""
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR) if weights is None else weights
        return {source: int(weights[key][ACTIVATION_BITWIDTH]) for key, (source, _) in self._layer_tensors().items()
                if ACTIVATION_BITWIDTH in weights[key]}  # fmt: skip

    @property
    def lpbq_nodes(self) -> list[str]:
        """The ONNX node names of the layers annotated for LPBQ, in the graph's order."""
        return [str(entry["node"]) for entry in function_attr(self._annotated["main"], WEIGHTS_ATTR).values()]

    @property
    def activation_bitwidths(self) -> dict[str, int]:
        """The layers given their own activation width by :meth:`set_activation_bitwidth`, by ONNX node."""
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        return {str(e["node"]): int(e[ACTIVATION_BITWIDTH]) for e in weights.values() if ACTIVATION_BITWIDTH in e}

    def _check_fits_some_layer(self, annotated, config: LPBQConfig, op_types, excluded_nodes) -> None:
        """A configuration that no selected layer can take is a mistake, not a silent no-op."""
        selected = [
            layer
            for layer in self._imported.layers.values()
            if layer.op_type in op_types and layer.node_name not in excluded_nodes
        ]
        if selected and not function_attr(annotated["main"], WEIGHTS_ATTR):
            msg = (
                f"block_size {config.block_size} fits none of the {len(selected)} selected layers "
                f"(input channels: {', '.join(sorted({str(layer.input_channels) for layer in selected}))})"
            )
            raise ValueError(msg)

    def compute_encodings(
        self, forward_pass_callback: Callable | None = None, forward_pass_callback_args: Any = None
    ) -> None:
        """Encode every selected weight, then run ``forward_pass_callback(sim, args)`` if given,
        recording the range of every activation tensor (:func:`lpbq_tvm.onnx_layers.activation_tensors`;
        an LPBQ layer's input and output ranges are those of its tensors) and of each Gemm's product
        before its bias.

        Layers with ``encoder="mse-act"`` need the callback: it first runs on the float model to
        measure each layer's input energy per channel, which weighs the encoder's error. With a
        precision budget (:meth:`set_precision_budget`) the int8 layers are then chosen on the
        batches the callback ran (:func:`lpbq_tvm.analysis.select_precision`) and applied
        (:meth:`apply_precision`), once per configuration.
        """
        if self._budget and forward_pass_callback is None:
            raise ValueError("the precision budget is measured on calibration data: pass a callback")
        choose = bool(self._budget) and self.precision_choice is None
        batches = self._encode_and_calibrate(forward_pass_callback, forward_pass_callback_args, record=choose)
        if choose:
            from lpbq_tvm.analysis import select_precision

            self.apply_precision(select_precision(self, batches, **self._budget), batches)

    def apply_precision(self, choice, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Keep ``choice``'s layers (a :class:`~lpbq_tvm.analysis.PrecisionChoice`) at int8 per channel,
        then encode again and recalibrate on ``batches``; the choice becomes :attr:`precision_choice`."""
        self.set_int8_per_channel(choice.int8_nodes)
        self._encode_and_calibrate(lambda sim, data: [sim.run(batch) for batch in data], list(batches))
        self.precision_choice = choice

    def _encode_and_calibrate(self, callback: Callable | None, args: Any, record: bool = False):
        """:meth:`compute_encodings` without the precision choice; with ``record``, the batches the
        callback ran through :meth:`run`."""
        from lpbq_tvm.passes.encode_lpbq import EncodeLPBQ, attach_input_importance
        from lpbq_tvm.passes.lower_lpbq import attach_activation_ranges

        self._encoded, self._activation_ranges, annotated = None, {}, self._annotated
        activation_aware = self._activation_aware_layers()
        if activation_aware:
            if callback is None:
                nodes = ", ".join(sorted(activation_aware.values()))
                raise ValueError(f"encoder mse-act weighs errors by calibration data: pass a callback ({nodes})")
            energies = {key: ChannelEnergyObserver(axis) for key, axis in self._input_channel_axes(activation_aware)}
            observers: dict[str, list] = {}
            tensors = self._layer_tensors()
            for key, observer in energies.items():  # (layers may share an input: a decoder's q, k and v)
                observers.setdefault(tensors[key][0], []).append(observer)
            self._observe(observers, callback, args)
            annotated = attach_input_importance(annotated, {k: o.mean_square() for k, o in energies.items()})
        self._encoded = EncodeLPBQ()(annotated)
        self._warn_skipped()
        if callback is None:
            return None
        activations = activation_tensors(self.graph, self.weights)
        ranges = {name: RangeObserver(self.quant_scheme, self.percentile) for name in activations}
        pre_bias = {key: RangeObserver(self.quant_scheme, self.percentile) for key in self._pre_bias_tensors()}
        observers = {name: [observer] for name, observer in ranges.items()}
        for key, (output, bias) in self._pre_bias_tensors().items():
            observers[output].append(_Shifted(pre_bias[key], -bias))
        self._recorded = [] if record else None
        try:
            self._observe(observers, callback, args)
        finally:
            batches, self._recorded = self._recorded, None
        self._activation_ranges = {name: observer.range() for name, observer in ranges.items() if observer.seen}
        unseen = sorted(ranges.keys() - self._activation_ranges.keys())
        layer_ranges = {}
        for key, (inp, out) in self._layer_tensors().items():
            missed = [name for name in (inp, out) if name in unseen]
            if missed:
                msg = f"no calibration data reached {', '.join(missed)} (layer {key}): empty in every batch?"
                raise ValueError(msg)
            layer_ranges[key] = {"input": self._activation_ranges[inp], "output": self._activation_ranges[out]}
        if unseen:  # empty tensors (a decoder's past of length 0) or branches no batch took: not quantized
            listed = ", ".join(unseen[:UNSEEN_LISTED]) + (", ..." if len(unseen) > UNSEEN_LISTED else "")
            logger.warning("no calibration data reached %d tensors, left unquantized: %s", len(unseen), listed)
        for key, observer in pre_bias.items():
            layer_ranges[key]["pre_bias"] = observer.range()
        self._encoded = attach_activation_ranges(self._encoded, layer_ranges)
        return batches

    def _warn_skipped(self) -> None:
        skipped = [row for row in self.report() if row.status == "skipped"]
        if skipped:
            logger.warning(
                "%d of %d layers not quantized with LPBQ (see sim.report()): %s",
                len(skipped),
                len(self._imported.layers),
                "; ".join(f"{row.node}: {row.reason}" for row in skipped),
            )

    def _observe(self, observers: dict[str, list], callback: Callable, args: Any) -> None:
        """Run the callback with ``observers`` (tensor name -> observers) fed by every ``sim.run``."""
        self._observers, self._session = observers, None
        try:
            callback(self, args)
        except ValueError as error:
            raise ValueError(f"calibration failed: {error}") from error
        finally:
            self._observers, self._session = None, None

    def _activation_aware_layers(self) -> dict[str, str]:
        annotations = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        return {key: str(a["node"]) for key, a in annotations.items() if str(a.get("encoder")) == "mse-act"}

    def _input_channel_axes(self, weights) -> list[tuple[str, int]]:
        """The axis of each layer's input that its weight's block axis runs along (Conv: 1, else last)."""
        return [(key, 1 if self._imported.layers[key].op_type == "Conv" else -1) for key in weights]

    def _pre_bias_tensors(self) -> dict[str, tuple[str, np.ndarray]]:
        """Gemm layers with a bias: weight name -> (output tensor, bias). Exports write them as
        MatMul -> Q/DQ -> Add(bias), so the product before the bias needs its own range."""
        from lpbq_tvm.exports._onnx_graph import bias_array

        result = {}
        for node in self.graph.graph.node:
            if node.op_type == "Gemm" and node.input[1] in self.encodings:
                bias = bias_array(self.graph, node, self.weights)
                if bias is not None:
                    result[node.input[1]] = (node.output[0], bias)
        return result

    def layer_activation_encodings(self, bitwidth: int) -> dict[str, dict[str, ActivationEncoding]]:
        """Per LPBQ layer (weight name): its ``input``, ``output`` and (Gemm with bias) ``pre_bias`` encodings,
        ``bitwidth`` wide unless their tensor has its own width (the product before the bias: the output's)."""
        ranges = function_attr(self.encoded_module["main"], ACTIVATION_RANGES_ATTR)
        widths, tensors = self._tensor_widths(), self._layer_tensors()

        def width(key: str, where: str) -> int:
            source, result = tensors[key]
            return widths.get(source if where == "input" else result, bitwidth)

        return {
            str(key): {
                str(where): activation_encoding(*bounds, width(str(key), str(where))) for where, bounds in entry.items()
            }
            for key, entry in ranges.items()
        }

    def qdq_model(self, bitwidth: int, quantize_all_activations: bool = True) -> onnx.ModelProto:
        """The prepared model with ``Q -> DQ`` (``bitwidth`` encodings) after every activation tensor, or
        only after the LPBQ layers' inputs and outputs; fp32 weights. The QNN export rewrites its LPBQ
        layers; ``htp-sim`` compiles it (:func:`lpbq_tvm.exports.qnn_onnx.quantize_activations`)."""
        from lpbq_tvm.exports.qnn_onnx import quantize_activations

        tensors = self.tensor_activation_encodings(bitwidth) if quantize_all_activations else None
        return quantize_activations(self.model, self.layer_activation_encodings(bitwidth), tensors)

    def qdq_module(self, bitwidth: int, quantize_all_activations: bool = True):
        """The Relax import of :meth:`qdq_model`, with the LPBQ state of :attr:`encoded_module` (every
        function attribute the passes added: selection, encodings, activation ranges), ready for LowerLPBQ.
        Its weights are the same parameters: the Q/DQ constants are inlined on import."""
        encoded = self.encoded_module["main"]
        mod = import_onnx(self.qdq_model(bitwidth, quantize_all_activations), shared=self._imported).mod
        main = mod["main"]
        for key, value in encoded.attrs.items():
            if key not in main.attrs:
                main = main.with_attr(key, value)
        mod.update_func(mod.get_global_var("main"), main)
        return mod

    def _layer_tensors(self) -> dict[str, tuple[str, str]]:
        """Input and output tensor names of every LPBQ layer, by weight name (the node's second input:
        an importer names unnamed nodes, so the annotation's node name need not be the graph's)."""
        nodes = {node.input[1]: node for node in self.graph.graph.node if len(node.input) > 1}
        weights = function_attr(self._annotated["main"], WEIGHTS_ATTR)
        return {key: (nodes[key].input[0], nodes[key].output[0]) for key in weights}

    @property
    def is_calibrated(self) -> bool:
        return bool(self._activation_ranges)

    @property
    def activation_encodings(self) -> dict[str, ActivationEncoding]:
        """Calibrated encodings (``default_activation_bw``) of every activation tensor, by ONNX tensor name."""
        return self.tensor_activation_encodings(self.default_activation_bw)

    def tensor_activation_encodings(self, bitwidth: int) -> dict[str, ActivationEncoding]:
        """Calibrated ``bitwidth`` encodings of every activation tensor, by ONNX tensor name (the input of
        a layer given its own width, :meth:`set_activation_bitwidth`, at that width)."""
        self._require_encodings()
        own = self._tensor_widths()
        return {
            name: activation_encoding(*bounds, own.get(name, bitwidth))
            for name, bounds in self._activation_ranges.items()
        }

    def _require_encodings(self) -> None:
        if self._encoded is None:
            msg = (
                "no encodings yet: call sim.compute_encodings() first (with a calibration callback for the "
                "integer modes and the QNN export)"
            )
            raise RuntimeError(msg)

    @property
    def encodings(self) -> dict[str, LPBQEncoding]:
        """LPBQ encodings by ONNX weight (initializer) name."""
        from lpbq_tvm.passes.encode_lpbq import read_encodings

        return read_encodings(self.encoded_module["main"])

    def report(self) -> list[LayerReport]:
        """One row per Gemm / MatMul / Conv weight, in graph order."""
        main = (self._encoded or self._annotated)["main"]
        skipped = function_attr(main, SKIPPED_ATTR)
        stored = function_attr(main, ENCODINGS_ATTR)
        encodings = self.encodings if self._encoded is not None else {}
        rows = []
        for name, layer in self._imported.layers.items():
            base = dict(node=layer.node_name, op_type=layer.op_type, weight=name, shape=tuple(layer.weight.shape))
            if name in encodings:
                encoding = encodings[name]
                histogram = np.bincount(
                    encoding.per_block_int_scale.ravel(), minlength=encoding.config.max_int_scale + 1
                )
                dead = np.moveaxis(layer.weight, layer.channel_axis, 0).reshape(
                    layer.weight.shape[layer.channel_axis], -1
                )
                rows.append(
                    LayerReport(
                        **base,
                        status="int8" if encoding.is_per_channel else "lpbq",
                        dead_channels=int((~dead.any(axis=1)).sum()),
                        block_size=encoding.block_size,
                        encoder=encoding.config.encoder,
                        sqnr_db=float(stored[name]["sqnr_db"]),
                        bits_per_weight=bits_per_weight(encoding),
                        k_histogram=tuple(int(c) for c in histogram[1:]),
                    )
                )
            elif name in skipped:
                rows.append(LayerReport(**base, status="skipped", reason=str(skipped[name]["reason"])))
            else:
                rows.append(
                    LayerReport(
                        **base,
                        status="pending" if self._encoded is None else "skipped",
                        reason="" if self._encoded is None else "not selected",
                    )
                )
        return rows

    def _simulation_session(self):
        """onnxruntime on the prepared model with LPBQ-dequantized weights (fp32 before encoding),
        also returning the observed tensors while observers are set: the session, and the layers'
        weights it is fed on every run (onnxruntime would copy them as initializers; fed, it reads
        these arrays in place)."""
        import onnxruntime as ort

        from lpbq_tvm.onnx_model import session_with_weights

        if self._session is None:
            model = onnx.ModelProto()
            model.CopyFrom(self.graph)
            encodings = self.encodings if self._encoded is not None else {}
            fed = {
                name: encodings[name].qdq_weight if name in encodings else self.weights[name]
                for name in self.layers
                if name in self.weights
            }
            constants = {name: w for name, w in self.weights.items() if name not in fed}
            if self._observers is not None:
                existing = {output.name for output in model.graph.output}
                model.graph.output.extend(
                    onnx.ValueInfoProto(name=name) for name in self._observers if name not in existing
                )
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3  # errors only
            self._session = session_with_weights(model, constants, options), fed
        return self._session

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Quantization-simulated outputs: the fp32 model with LPBQ-dequantized weights.

        During ``compute_encodings``' callback it also feeds the calibration observers.
        """
        if self._observers is None:
            self._require_encodings()
        session, fed = self._simulation_session()
        names = [output.name for output in session.get_outputs()]
        results = dict(zip(names, session.run(names, {**inputs, **fed}), strict=True))
        if self._recorded is not None:
            self._recorded.append({name: np.array(value) for name, value in inputs.items()})
        for name, observers in (self._observers or {}).items():
            for observer in observers:
                observer.update(results[name])
        return {info.name: results[info.name] for info in self.outputs}

    def aimet_encodings(self, version: str = "1.0.0") -> dict[str, Any]:
        """The AIMET encodings file: LPBQ weights, int8 per-channel weights for the layers that
        did not take LPBQ, and the calibrated activations (see :mod:`lpbq_tvm.exports.aimet_json`)."""
        from lpbq_tvm.exports.aimet_json import encodings_file

        fallback = {
            row.weight: (self._imported.layers[row.weight].weight, self._imported.layers[row.weight].channel_axis)
            for row in self.report()
            if row.status == "skipped"
        }
        return encodings_file(self.encodings, fallback, self.activation_encodings, [], version)

    def export(
        self, path: str | PathLike, filename_prefix: str, *, version: str = "1.0.0", overwrite: bool = False
    ) -> tuple[Path, Path]:
        """Write ``<prefix>.onnx`` (the prepared fp32 model) and ``<prefix>.encodings`` (AIMET JSON ``version``)."""
        directory = Path(path)
        encodings_text = json.dumps(self.aimet_encodings(version), indent=2)
        onnx_path = atomic_write(
            directory / f"{filename_prefix}.onnx", lambda tmp: onnx.save(self.model, tmp), overwrite=overwrite
        )
        json_path = atomic_write(
            directory / f"{filename_prefix}.encodings",
            lambda tmp: Path(tmp).write_text(encodings_text),
            overwrite=overwrite,
        )
        return onnx_path, json_path


def _with_weights(mod, weights: dict[str, Any]):
    """A copy of ``mod`` whose main function's ``lpbq.weights`` is ``weights``."""
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), mod["main"].with_attr(WEIGHTS_ATTR, weights))
    return mod


def _with_attrs_of(mod, source):
    """``mod`` with the attributes of ``source["main"]`` that the LPBQ passes added (those an import lacks)."""
    main, added = mod["main"], source["main"].attrs
    carried = {key: value for key, value in added.items() if key not in main.attrs}
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), main.with_attrs(carried))
    return mod


def set_grouped_blockwise_quantization_for_weights(
    sim: QuantizationSimModel,
    op_types: str | Iterable[str] = ("Gemm", "MatMul", "Conv"),
    bitwidth: int = 4,
    decompressed_bw: int = 8,
    block_size: int = 64,
    block_grouping: int = -1,
    strict: bool = False,
    excluded_nodes: Iterable[str] | None = None,
    encoder: str = "aimet",
    accuracy_budget: float | None = None,
    ratio: float | None = None,
) -> None:
    """Quantize the weights of ``op_types`` with LPBQ (AIMET's name and arguments).

    ``encoder`` (an extension): ``"aimet"`` (AIMET's rule, bit-exact), ``"mse"`` (scales that
    minimise the magnitude-weighted weight error) or ``"mse-act"`` (the error weighted by calibration data); every
    choice writes the same format.

    May be called several times: a later call wins for the op types it selects. ``strict=True``
    raises ``ValueError`` for a layer that cannot take the configuration; otherwise that layer
    stays unquantized and is reported with the reason.

    ``accuracy_budget`` (a model-output cosine to fp32, e.g. 0.99) or ``ratio`` (the share of
    weights kept at 4 bits, NNCF's term), extensions: ``sim.compute_encodings(callback, args)``
    then keeps the most sensitive layers at int8 per channel to meet it on the calibration data
    (:meth:`QuantizationSimModel.set_precision_budget`).
    """
    if isinstance(op_types, str):
        op_types = (op_types,)
    sim.apply_lpbq(
        LPBQConfig(bitwidth, decompressed_bw, block_size, block_grouping, encoder),
        tuple(op_types),
        excluded_nodes or (),
        strict,
    )
    if accuracy_budget is not None or ratio is not None:
        sim.set_precision_budget(accuracy_budget, ratio)
