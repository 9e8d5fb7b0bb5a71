"""Accuracy you can steer: per-layer sensitivity to LPBQ and precision selection (LPBQ 4-bit or int8).

Everything is measured on calibration batches with onnxruntime on the prepared fp32 model whose
LPBQ layer weights are fed as inputs, so one session evaluates any mix of fp32, LPBQ and int8
per-channel weights (the weight-only simulation of that mix). The accuracy of a mix is the
**cosine** of its model outputs to fp32 over all batches (the smallest over the outputs).

* :func:`sensitivity`: for each LPBQ layer, quantize only that layer: the model-output cosine and
  the layer's own output SQNR (same input, fp32 vs LPBQ weight). Worst layer first.
* :func:`select_precision`: which layers to keep at int8 per channel (8-bit codes, one scale per
  output channel, the same kernels and exports) so that the model meets ``target_cosine`` with
  the most weights at 4 bits, or so that ``ratio`` of the weights stay at 4 bits (NNCF's ``ratio``).
  With a target: layers move to int8 in order of sensitivity until the target is met, then each
  int8 layer, largest first, returns to 4 bits if the target still holds, until none can. The
  result is **1-minimal**: returning any single int8 layer to 4 bits breaks the target on the
  calibration data. (Not necessarily the global optimum, which needs a search over subsets.)
  The sim is not changed: :meth:`QuantizationSimModel.apply_precision` applies a choice (int8 per
  channel for its layers, then encodings and calibration again on the same batches), as
  ``compute_encodings`` does under a precision budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from lpbq_tvm.encoder import LPBQConfig, encode_lpbq, sqnr_db
from lpbq_tvm.packing import encoding_nbytes

__all__ = ["LayerSensitivity", "PrecisionChoice", "select_precision", "sensitivity"]

logger = logging.getLogger(__name__)

Batches = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class LayerSensitivity:
    """One LPBQ layer quantized alone: what it costs the model output and its own output."""

    node: str
    weight: str
    op_type: str
    weights: int  # weight elements
    cosine: float  # model outputs vs fp32, only this layer at LPBQ
    layer_sqnr_db: float  # this layer's output vs fp32, same input


@dataclass(frozen=True)
class PrecisionChoice:
    """The layers kept at int8 and what the mix reaches, next to all-LPBQ and all-int8."""

    int8_nodes: tuple[str, ...]
    cosine: float  # calibration data, the chosen mix
    held_out_cosine: float | None
    share_4bit: float  # of all Gemm / MatMul / Conv weight elements (fp32 layers included)
    bits_per_weight: float  # storage of all those weights, fp32 layers at 32
    all_lpbq: tuple[float, float, float]  # (cosine, share_4bit, bits_per_weight) with every candidate at 4 bits
    all_int8: tuple[float, float, float]
    rule: str  # how the choice was made, in words


class _Evaluator:
    """One onnxruntime session over the prepared model with the LPBQ weights as inputs."""

    def __init__(self, sim, batches: Batches) -> None:
        import onnxruntime as ort

        from lpbq_tvm.onnx_model import session_with_weights

        if not batches:
            raise ValueError("sensitivity analysis needs at least one calibration batch")
        encodings = sim.encodings
        self.layers = {
            name: layer
            for name, layer in sim.layers.items()
            if name in encodings and not encodings[name].is_per_channel
        }
        if not self.layers:
            raise ValueError("no LPBQ layers to analyse: apply set_grouped_blockwise_quantization_for_weights first")
        self.fixed = {name: encodings[name].qdq_weight for name in encodings if name not in self.layers}
        int8 = {name: _int8_encoding(layer) for name, layer in self.layers.items()}
        self.lpbq = {name: encodings[name].qdq_weight for name in self.layers}
        self.int8 = {name: encoding.qdq_weight for name, encoding in int8.items()}
        self.nbytes = {name: (encoding_nbytes(encodings[name]), encoding_nbytes(int8[name])) for name in self.layers}
        # Layers the user already set to int8 (``fixed``) are quantized in every mix, fp32 in the reference.
        self.fp32 = {name: sim.layers[name].weight for name in [*self.layers, *self.fixed]}
        self.outputs = [info.name for info in sim.outputs]
        self.layer_outputs = {name: _output_of(sim.graph, name) for name in self.layers}
        model = onnx.ModelProto()
        model.CopyFrom(sim.graph)  # the layers' weights are inputs fed per run, the others initializers
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in self.layer_outputs.values())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        constants = {name: value for name, value in sim.weights.items() if name not in self.fp32}
        self.session = session_with_weights(model, constants, options)
        self.batches = list(batches)
        self.reference = self.run({})
        self.total_weights = sum(layer.weight.size for layer in sim.layers.values())
        self.other_bytes = sum(  # fp32 layers, and layers the user already set to int8
            encoding_nbytes(encodings[name]) if name in encodings else 4 * layer.weight.size
            for name, layer in sim.layers.items()
            if name not in self.layers
        )

    def run(self, weights: Mapping[str, np.ndarray], batches: Batches | None = None) -> list[dict[str, np.ndarray]]:
        """Outputs (model and layer outputs) per batch with ``weights`` replacing the fp32 ones."""
        names = self.outputs + list(self.layer_outputs.values())
        feeds = {**self.fp32, **weights}
        return [
            dict(zip(names, self.session.run(names, {**batch, **feeds}), strict=True))
            for batch in (self.batches if batches is None else batches)
        ]

    def cosine(self, results: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]] | None = None):
        reference = self.reference if reference is None else reference
        return min(
            _cosine(
                np.concatenate([r[name].ravel() for r in results]), np.concatenate([r[name].ravel() for r in reference])
            )
            for name in self.outputs
        )

    def mix(self, int8: set[str], only: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Weights of a mix: ``int8`` layers at int8, the others (or only ``only``) at LPBQ."""
        chosen = self.layers if only is None else only
        return {**self.fixed, **{name: (self.int8 if name in int8 else self.lpbq)[name] for name in chosen}}

    def footprint(self, int8: set[str]) -> tuple[float, float]:
        """(share of weight elements at 4 bits, storage bits per weight) of a mix."""
        four = sum(layer.weight.size for name, layer in self.layers.items() if name not in int8)
        nbytes = self.other_bytes + sum(self.nbytes[name][name in int8] for name in self.layers)
        return four / self.total_weights, 8.0 * nbytes / self.total_weights

    def summary(self, int8: set[str]) -> tuple[float, float, float]:
        """(cosine, share at 4 bits, bits per weight) of a mix."""
        return (self.cosine(self.run(self.mix(int8))), *self.footprint(int8))


def sensitivity(sim, batches: Batches) -> list[LayerSensitivity]:
    """Each LPBQ layer of ``sim`` quantized alone on ``batches``; the most damaging layer first."""
    return _ranking(_Evaluator(sim, batches))


def _ranking(evaluator: _Evaluator) -> list[LayerSensitivity]:
    rows = []
    for name, layer in evaluator.layers.items():
        results = evaluator.run(evaluator.mix(set(), only=[name]))
        output = evaluator.layer_outputs[name]
        reference = np.concatenate([r[output].ravel() for r in evaluator.reference])
        quantized = np.concatenate([r[output].ravel() for r in results])
        rows.append(
            LayerSensitivity(
                layer.node_name,
                name,
                layer.op_type,
                int(layer.weight.size),
                evaluator.cosine(results),
                float(sqnr_db(reference, quantized)),
            )
        )
    return sorted(rows, key=lambda row: (row.cosine, row.layer_sqnr_db))


def select_precision(
    sim,
    batches: Batches,
    *,
    target_cosine: float | None = None,
    ratio: float | None = None,
    held_out: Batches | None = None,
) -> PrecisionChoice:
    """Choose the int8 layers of ``sim`` (see the module docstring) on ``batches``; ``sim`` is not changed."""
    if (target_cosine is None) == (ratio is None):
        raise ValueError("give exactly one budget: target_cosine (e.g. 0.99) or ratio (e.g. 0.9)")
    if target_cosine is not None and not 0.0 < target_cosine <= 1.0:
        raise ValueError(f"target_cosine must lie in (0, 1], got {target_cosine}")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    evaluator = _Evaluator(sim, batches)
    ranking = _ranking(evaluator)
    all_lpbq, all_int8 = evaluator.summary(set()), evaluator.summary(set(evaluator.layers))
    int8: set[str] = set()
    if ratio is not None:
        for row in ranking:
            if evaluator.footprint(int8 | {row.weight})[0] >= ratio:
                int8.add(row.weight)
        rule = f"most sensitive layers at int8 while >= {ratio:.0%} of the weights stay at 4 bits"
    else:
        if all_int8[0] < target_cosine:
            msg = (
                f"target cosine {target_cosine} is out of reach: with every LPBQ layer at int8 per channel the "
                f"model reaches {all_int8[0]:.5f} on the calibration data (the fp32 layers and int8 itself limit it)"
            )
            raise ValueError(msg)
        cosine = all_lpbq[0]
        for row in ranking:
            if cosine >= target_cosine:
                break
            int8.add(row.weight)
            cosine = evaluator.summary(int8)[0]
        changed = True
        while changed:  # return layers to 4 bits, largest first, while the target holds
            changed = False
            for name in sorted(int8, key=lambda n: -evaluator.layers[n].weight.size):
                if evaluator.summary(int8 - {name})[0] >= target_cosine:
                    int8.discard(name)
                    changed = True
        rule = (
            f"cosine >= {target_cosine} on the calibration data: layers to int8 by sensitivity, then back to "
            "4 bits largest first while the target holds (no single int8 layer can return to 4 bits)"
        )
    cosine, share, bits = evaluator.summary(int8)
    held_out_cosine = None
    if held_out:
        reference = evaluator.run(evaluator.fp32, held_out)
        held_out_cosine = evaluator.cosine(evaluator.run(evaluator.mix(int8), held_out), reference)
    nodes = tuple(row.node for row in ranking if row.weight in int8)
    logger.info("precision selection: int8 %s; cosine %.5f, %.1f%% at 4 bits", nodes or "none", cosine, 100 * share)
    return PrecisionChoice(nodes, cosine, held_out_cosine, share, bits, all_lpbq, all_int8, rule)


def _output_of(model: onnx.ModelProto, weight: str) -> str:
    return next(node.output[0] for node in model.graph.node if len(node.input) > 1 and node.input[1] == weight)


def _int8_encoding(layer):
    """The int8 per-channel encoding of a layer: 8-bit codes, ``k`` = 1, one block per channel."""
    config = LPBQConfig.int8_per_channel(layer.input_channels)
    return encode_lpbq(layer.weight, layer.channel_axis, layer.block_axis, **config.as_dict(), name=layer.node_name)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
