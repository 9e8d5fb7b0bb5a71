"""Write a quantization simulation in the formats other toolchains consume, each checked before it is written.

One registry, :data:`EXPORTERS`, serves the Python API (:func:`export`) and the CLI (``lpbq-tvm
export --format``). An :class:`Exporter` builds its artifact in memory, validates it (raising
``ValueError`` with what failed, or returning the checks it passed, for the report) and saves it
atomically: a failed export writes nothing, and an existing file is replaced only with
``overwrite=True``.

===================  =====================================================================================
format               built, then validated
===================  =====================================================================================
``aimet-json``       AIMET encodings 1.0.0 / 2.0.0 (:mod:`~lpbq_tvm.exports.aimet_json`); read back
                     from its JSON text, every LPBQ entry equal to the encoder's
``qnn-onnx``         QDQ ONNX for Qualcomm's QNN EP (:mod:`~lpbq_tvm.exports.qnn_onnx`); onnx checker,
                     QNN pre-flight check, then onnxruntime CPU against the ``htp-sim`` target compiled
                     with TVM from the same graph: output codes within ``LSB_TOLERANCE`` where an output is
                     an LPBQ layer's (quantized) output, cosine >= 0.999 elsewhere
``ort-onnx``         blocked INT4 ONNX for onnxruntime CPU (:mod:`~lpbq_tvm.exports.ort_onnx`); onnx
                     checker, every LPBQ MatMul fused into ``MatMulNBits``, outputs equal to ``sim.run``
                     (the weight-only simulation) to within float32 reordering
``ort-nbits-onnx``   the same with ``com.microsoft.MatMulNBits`` nodes written directly
``tvm``              the deployment bundle of ``lpbq-tvm compile`` (:mod:`lpbq_tvm.bundle`); run once on
                     the sample inputs where its target runs here
===================  =====================================================================================

onnxruntime runs a QNN export as written, without its graph optimizations: those replace Q/DQ
groups by its own integer kernels and rewrite operators (e.g. HardSwish as HardSigmoid · x), which
round differently, and through a fully quantized model's many requantizations the differences
compound.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lpbq_tvm.bundle import write_bundle
from lpbq_tvm.compiler import compile as compile_model
from lpbq_tvm.exports.aimet_json import VERSIONS, param_entry, read_encodings
from lpbq_tvm.io import atomic_write, check_writable
from lpbq_tvm.targets import get_target

__all__ = ["EXPORTERS", "ExportOptions", "ExportReport", "Exporter", "LSB_TOLERANCE", "export", "get_exporter"]

# Output codes of onnxruntime's float QDQ evaluation vs the integer simulation (docs/design.md §5):
# one LSB of rounding difference per requantization, plus, at 16 bits, onnxruntime's own float32
# summation error, which over a K-term dot product (K·2^-24·Σ|x||w|) reaches a uint16 LSB of the
# output range for K in the thousands.
LSB_TOLERANCE = {8: 2, 16: 2}
# Float outputs of the onnxruntime export vs the weight-only simulation: the same arithmetic in
# another summation order differs by ~1e-6 relative; quantization error is ~1e-2.
FLOAT_RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportOptions:
    """What an exporter may take; each uses the options of its format."""

    sample_inputs: Mapping[str, np.ndarray] | None = None  # validation inputs (default: seeded random ones)
    activation_bitwidth: int = 8  # qnn-onnx
    quantize_all_activations: bool = True  # qnn-onnx: Q/DQ on every activation, or the LPBQ layers' only
    encoding_version: str = "1.0.0"  # aimet-json
    target: str = "cpu"  # tvm
    mode: str = "weight-only"  # tvm


@dataclass
class ExportReport:
    path: Path
    format: str
    bytes: int
    checks: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    """One export format: how its artifact is built, validated and saved."""

    name: str  # the format's name, the CLI's --format
    title: str  # what it is called in messages
    suffix: str  # of the file it writes ("/" for a directory)
    needs_calibration: bool  # it quantizes activations: sim.compute_encodings must have had a callback
    summary: str  # one line, for --help
    build: Callable[[Any, ExportOptions], Any]  # (sim, options) -> the artifact
    validate: Callable[[Any, Any, ExportOptions], dict[str, str]]  # (artifact, sim, options) -> checks passed
    save: Callable[[Any, Path, bool], Path]  # (artifact, path, overwrite) -> the path written


def export(sim, path: str | PathLike, format: str, *, overwrite: bool = False, **options: Any) -> ExportReport:  # noqa: A002
    """Export ``sim`` as ``format`` (a name of :data:`EXPORTERS`) to ``path``, validated first; ``options``
    are the fields of :class:`ExportOptions`."""
    exporter = get_exporter(format)
    check_writable(path, overwrite)
    sim.encoded_module  # noqa: B018 - raises, naming the call to make, before compute_encodings
    if exporter.needs_calibration and not sim.is_calibrated:
        msg = f"the {exporter.title} export quantizes activations: calibrate with sim.compute_encodings(callback, args)"
        raise ValueError(msg)
    chosen = ExportOptions(**options)
    if chosen.sample_inputs is None:
        chosen = ExportOptions(**{**options, "sample_inputs": sim.random_inputs()})
    artifact = exporter.build(sim, chosen)
    checks = exporter.validate(artifact, sim, chosen)
    written = exporter.save(artifact, Path(path), overwrite)
    files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
    label = f"{format} {chosen.encoding_version}" if format == "aimet-json" else format
    return ExportReport(written, label, sum(p.stat().st_size for p in files), checks)


def get_exporter(name: str) -> Exporter:
    """The exporter of format ``name``; ``ValueError`` lists the formats otherwise."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; known: {', '.join(EXPORTERS)}") from None


def _save_onnx(model: onnx.ModelProto, path: Path, overwrite: bool) -> Path:
    return atomic_write(path, lambda tmp: onnx.save(model, tmp), overwrite=overwrite)


def _save_text(text: str, path: Path, overwrite: bool) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)


# aimet-json ------------------------------------------------------------------------------------


def _build_aimet(sim, options: ExportOptions) -> str:
    if options.encoding_version not in VERSIONS:
        raise ValueError(f"unknown AIMET encoding version {options.encoding_version!r}; known: {', '.join(VERSIONS)}")
    return json.dumps(sim.aimet_encodings(options.encoding_version), indent=2) + "\n"


def _validate_aimet(text: str, sim, options: ExportOptions) -> dict[str, str]:
    version = options.encoding_version
    entries = read_encodings(json.loads(text))
    for name, encoding in sim.encodings.items():
        if entries.get(name) != param_entry(name, encoding, version):
            raise ValueError(f"entry {name!r} does not read back as the encoder wrote it")
    checks = {"read back": f"{len(entries)} entries, LPBQ entries equal the encoder's"}
    biased = sorted(layer.node_name for name, layer in sim.layers.items() if name in sim.encodings and layer.has_bias)
    if version == "2.0.0" and biased:
        # docs/design.md §5: a 2.0.0 file switches Qualcomm's converter to its newer quantizer, which
        # wants int32 bias encodings; this file (like 1.0.0) carries none.
        checks["note"] = (
            f"{len(biased)} LPBQ layers have a bias ({', '.join(biased[:3])}{', ...' if len(biased) > 3 else ''}) "
            "and 2.0.0 makes Qualcomm's converter expect int32 bias encodings, which this file does not "
            "carry; version 1.0.0 is the safe choice for QNN"
        )
    return checks


# ort-onnx, ort-nbits-onnx ----------------------------------------------------------------------


def _build_ort(matmulnbits: bool) -> Callable[[Any, ExportOptions], onnx.ModelProto]:
    def build(sim, _options: ExportOptions) -> onnx.ModelProto:
        from lpbq_tvm.exports.ort_onnx import export_ort_onnx

        return export_ort_onnx(sim.model, sim.encodings, matmulnbits=matmulnbits)

    return build


def _validate_ort(exported: onnx.ModelProto, sim, options: ExportOptions) -> dict[str, str]:
    from lpbq_tvm.exports._onnx_graph import FP32_MATMULNBITS, session

    encodings = sim.encodings
    lpbq_matmuls = sum(
        1
        for node in sim.graph.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and len(node.input) > 1
        and node.input[1] in encodings
        and not encodings[node.input[1]].is_per_channel
    )
    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        ort_session = session(exported, str(optimized), ("MatMulAddFusion",), **FP32_MATMULNBITS)
        fused = sum(node.op_type == "MatMulNBits" for node in onnx.load(optimized).graph.node)
    if fused < lpbq_matmuls:  # int8 per-channel layers may fuse too (8-bit MatMulNBits)
        raise ValueError(f"onnxruntime fused {fused} of {lpbq_matmuls} LPBQ MatMul/Gemm layers into MatMulNBits")
    inputs = dict(options.sample_inputs)
    actual = dict(zip([o.name for o in ort_session.get_outputs()], ort_session.run(None, inputs), strict=True))
    for name, value in sim.run(inputs).items():
        scale = max(float(np.abs(value).max()), 1e-30)
        error = float(np.abs(actual[name] - value).max())
        if error > FLOAT_RELATIVE_TOLERANCE * scale:
            msg = f"output {name!r}: onnxruntime differs from the simulation by {error:.3g} (|y| up to {scale:.3g})"
            raise ValueError(msg)
    return {
        "onnx checker": "passed",
        "onnxruntime": f"{fused} MatMulNBits; outputs equal the weight-only simulation (rel. 1e-4)",
    }


# qnn-onnx --------------------------------------------------------------------------------------


def _build_qnn(sim, options: ExportOptions) -> onnx.ModelProto:
    from lpbq_tvm.exports.qnn_onnx import export_qnn_onnx

    bits = options.activation_bitwidth
    if bits not in LSB_TOLERANCE:
        raise ValueError(f"activation_bitwidth must be 8 or 16, got {bits}")
    tensors = sim.tensor_activation_encodings(bits) if options.quantize_all_activations else None
    return export_qnn_onnx(sim.model, sim.encodings, sim.layer_activation_encodings(bits), tensors)


def _output_encodings(sim, bitwidth: int) -> dict[str, object]:
    """Model outputs that are an LPBQ layer's output, with their encodings."""
    producers = {node.output[0]: node.input[1] for node in sim.graph.graph.node if len(node.input) > 1}
    layers = sim.layer_activation_encodings(bitwidth)
    return {
        info.name: layers[producers[info.name]]["output"] for info in sim.outputs if producers.get(info.name) in layers
    }


def _validate_qnn(exported: onnx.ModelProto, sim, options: ExportOptions) -> dict[str, str]:
    from lpbq_tvm.exports._onnx_graph import session

    bits, inputs = options.activation_bitwidth, dict(options.sample_inputs)
    ort_session = session(exported, optimize=False)
    actual = dict(zip([o.name for o in ort_session.get_outputs()], ort_session.run(None, inputs), strict=True))
    htp_sim = compile_model(sim, "htp-sim", f"w4a{bits}", quantize_all_activations=options.quantize_all_activations)
    quantized = _output_encodings(sim, bits)
    checks = {"onnx checker": "passed", "QNN pre-flight check": "passed"}
    for name, value in htp_sim.run(inputs).items():
        if name in quantized:
            encoding = quantized[name]
            codes = np.abs(encoding.quantize(actual[name]).astype(np.int64) - encoding.quantize(value))
            if codes.max() > LSB_TOLERANCE[encoding.bitwidth]:
                raise ValueError(f"output {name!r}: onnxruntime and htp-sim differ by {codes.max()} LSB")
            checks[name] = f"max {codes.max()} LSB vs htp-sim"
        else:
            a, b = actual[name].ravel().astype(np.float64), value.ravel().astype(np.float64)
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
            if cosine < 0.999:
                raise ValueError(f"output {name!r}: onnxruntime vs htp-sim cosine {cosine:.5f} < 0.999")
            checks[name] = f"cosine {cosine:.5f} vs htp-sim"
    return checks


# tvm -------------------------------------------------------------------------------------------


def _build_bundle(sim, options: ExportOptions):
    return compile_model(sim, options.target, options.mode)


def _validate_bundle(compiled, _sim, options: ExportOptions) -> dict[str, str]:
    weights = compiled.weight_bytes
    checks = {
        "bundle": f"target {compiled.target}, mode {compiled.mode}, weights {weights.total / 1024:.1f} KiB "
        f"({weights.lpbq_packed / 1024:.1f} KiB LPBQ packed)"
    }
    if get_target(compiled.target).device() is None:
        checks["run"] = f"not run here: {compiled.target} code runs on its device (lpbq-tvm run --rpc)"
        return checks
    outputs = compiled.run(options.sample_inputs)
    if not all(np.isfinite(value).all() for value in outputs.values()):
        raise ValueError("the compiled model gives non-finite outputs on the sample inputs")
    checks["run"] = "ran on the sample inputs here, outputs finite"
    return checks


def _save_bundle(compiled, path: Path, overwrite: bool) -> Path:
    return write_bundle(compiled, path, overwrite=overwrite)


_FORMATS = (
    Exporter(
        name="aimet-json",
        title="AIMET encodings",
        suffix=".encodings",
        needs_calibration=False,
        summary="AIMET encodings JSON (1.0.0 or 2.0.0)",
        build=_build_aimet,
        validate=_validate_aimet,
        save=_save_text,
    ),
    Exporter(
        name="qnn-onnx",
        title="QNN",
        suffix=".onnx",
        needs_calibration=True,
        summary="QDQ ONNX for Qualcomm's QNN execution provider (HTP)",
        build=_build_qnn,
        validate=_validate_qnn,
        save=_save_onnx,
    ),
    Exporter(
        name="ort-onnx",
        title="onnxruntime",
        suffix=".onnx",
        needs_calibration=False,
        summary="blocked INT4 ONNX for onnxruntime CPU (fused into MatMulNBits)",
        build=_build_ort(matmulnbits=False),
        validate=_validate_ort,
        save=_save_onnx,
    ),
    Exporter(
        name="ort-nbits-onnx",
        title="MatMulNBits",
        suffix=".onnx",
        needs_calibration=False,
        summary="onnxruntime's com.microsoft.MatMulNBits nodes, written directly",
        build=_build_ort(matmulnbits=True),
        validate=_validate_ort,
        save=_save_onnx,
    ),
    Exporter(
        name="tvm",
        title="TVM bundle",
        suffix="/",
        needs_calibration=False,
        summary="the TVM deployment bundle of lpbq-tvm compile (--target, --mode)",
        build=_build_bundle,
        validate=_validate_bundle,
        save=_save_bundle,
    ),
)
EXPORTERS: dict[str, Exporter] = {exporter.name: exporter for exporter in _FORMATS}
