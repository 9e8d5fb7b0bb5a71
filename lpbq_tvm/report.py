"""The quantization report: per-layer results, model totals, output agreement and plots, as HTML and Markdown.

``build_report(sim, inputs)`` compiles the fp32 model and each requested LPBQ mode with TVM, runs
them on ``inputs`` and collects, per Gemm / MatMul / Conv layer, the status (and reason when a
layer stays fp32), block size, encoder, SQNR, bits per weight and the distribution of ``k``.
With ``sensitivity`` rows (:func:`lpbq_tvm.analysis.sensitivity`) it adds their table and plot, worst first.
``write_report(report, directory)`` writes ``index.html`` (self-contained: the plots are embedded)
and ``report.md`` with the plot PNGs beside it, into a fresh directory renamed into place.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np

from lpbq_tvm.io import atomic_directory
from lpbq_tvm.packing import encoding_nbytes
from lpbq_tvm.quantsim import LayerReport, QuantizationSimModel

__all__ = ["LAYER_HEADERS", "Agreement", "ModelReport", "build_report", "layer_cells", "write_report"]


@dataclass(frozen=True)
class Agreement:
    """One compiled mode's output against the fp32 model, over all sample inputs."""

    mode: str
    output: str
    cosine: float
    max_abs_diff: float
    top1: float | None  # share of samples whose argmax over the last axis agrees (None for 1-wide outputs)


@dataclass
class ModelReport:
    name: str
    rows: list[LayerReport]
    fp32_bytes: int  # the candidate layers' weights in fp32
    lpbq_bytes: int  # the LPBQ layers in packed storage plus the skipped layers' fp32
    quantized_share: float  # share of candidate weights stored at 4 bits
    agreements: list[Agreement] = field(default_factory=list)
    sensitivity: list = field(default_factory=list)  # analysis.LayerSensitivity rows, worst first
    precision: object = None  # analysis.PrecisionChoice when a budget chose int8 layers

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per Gemm / MatMul / Conv weight element, fp32 layers included."""
        return 8.0 * self.lpbq_bytes / max(sum(int(np.prod(row.shape)) for row in self.rows), 1)


def _agreement(mode: str, name: str, actual: np.ndarray, reference: np.ndarray) -> Agreement:
    a, b = actual.ravel().astype(np.float64), reference.ravel().astype(np.float64)
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
    top1 = None
    if actual.ndim >= 2 and actual.shape[-1] > 1:
        top1 = float(np.mean(actual.argmax(-1) == reference.argmax(-1)))
    return Agreement(mode, name, cosine, float(np.abs(a - b).max()), top1)


def build_report(
    sim: QuantizationSimModel,
    inputs: Sequence[Mapping[str, np.ndarray]],
    modes: Sequence[str] = ("weight-only",),
    name: str = "model",
    sensitivity: Sequence = (),
) -> ModelReport:
    """Compile fp32 and each mode for the host CPU, run ``inputs`` and summarise (see the module docstring)."""
    from lpbq_tvm.compiler import compile as compile_model

    encodings = sim.encodings  # raises, naming the call to make, before compute_encodings
    rows = sim.report()
    layers = {row.weight: row for row in rows}
    fp32_bytes = sum(int(np.prod(row.shape)) * 4 for row in rows)
    lpbq_bytes, quantized = 0, 0
    for weight, encoding in encodings.items():
        lpbq_bytes += encoding_nbytes(encoding)
        quantized += int(np.prod(layers[weight].shape)) if not encoding.is_per_channel else 0
    lpbq_bytes += sum(int(np.prod(row.shape)) * 4 for row in rows if row.status == "skipped")
    total = sum(int(np.prod(row.shape)) for row in rows)
    report = ModelReport(name, rows, fp32_bytes, lpbq_bytes, quantized / total if total else 0.0)
    report.sensitivity = list(sensitivity)
    report.precision = sim.precision_choice
    reference = compile_model(sim, mode="fp32")
    expected = [reference.run(batch) for batch in inputs]
    for mode in modes:
        compiled = compile_model(sim, mode=mode)
        actual = [compiled.run(batch) for batch in inputs]
        for output in expected[0]:
            report.agreements.append(
                _agreement(
                    mode,
                    output,
                    np.concatenate([a[output] for a in actual]),
                    np.concatenate([e[output] for e in expected]),
                )
            )
    return report


def _plots(report: ModelReport) -> dict[str, bytes]:
    """PNG plots: per-layer SQNR, the distribution of k over all LPBQ blocks, the size breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [row for row in report.rows if row.status == "lpbq"]
    pngs = {}

    def save(figure, name: str) -> None:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        pngs[name] = buffer.getvalue()

    figure, axes = plt.subplots(figsize=(8, max(2.5, 0.28 * len(report.rows) + 1)))
    names = [row.node[-40:] for row in report.rows]
    values = [row.sqnr_db if row.sqnr_db is not None else 0.0 for row in report.rows]
    palette = {"lpbq": "#2a7ab9", "int8": "#e08a2c"}
    colors = [palette.get(row.status, "#c9c9c9") for row in report.rows]
    axes.barh(range(len(names)), values, color=colors)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("weight SQNR (dB); orange: int8 per channel; grey: kept in fp32")
    save(figure, "sqnr.png")

    figure, axes = plt.subplots(figsize=(6, 3))
    if quantized:
        counts = np.sum([np.pad(row.k_histogram, (0, 16 - len(row.k_histogram))) for row in quantized], axis=0)
        axes.bar(np.arange(1, 17), counts, color="#2a7ab9")
    axes.set_xlabel("integer block scale k")
    axes.set_ylabel("blocks")
    save(figure, "k_histogram.png")

    figure, axes = plt.subplots(figsize=(6, 2.6))
    axes.barh(["fp32", "LPBQ"], [report.fp32_bytes / 1024, report.lpbq_bytes / 1024], color=["#c9c9c9", "#2a7ab9"])
    axes.set_xlabel("weight KiB (Gemm / MatMul / Conv)")
    save(figure, "sizes.png")

    if report.sensitivity:
        figure, axes = plt.subplots(figsize=(8, max(2.5, 0.28 * len(report.sensitivity) + 1)))
        losses = [max(1.0 - row.cosine, 1e-12) for row in report.sensitivity]
        axes.barh(range(len(losses)), losses, color="#b9472a")
        axes.set_yticks(range(len(losses)), [row.node[-40:] for row in report.sensitivity], fontsize=7)
        axes.invert_yaxis()
        axes.set_xscale("log")
        axes.set_xlabel("1 - model output cosine with only this layer at LPBQ (worst first)")
        save(figure, "sensitivity.png")
    return pngs


def layer_cells(row: LayerReport) -> list[str]:
    """One table row per layer (columns ``LAYER_HEADERS``), shared by the report and the CLI."""
    lpbq = row.status in ("lpbq", "int8")
    k = ""
    if row.status == "lpbq":
        counts = np.asarray(row.k_histogram)
        values = np.repeat(np.arange(1, len(counts) + 1), counts)
        top = f"{counts[-1] / counts.sum():.0%} at {len(counts)}"
        k = f"{values.min()}–{values.max()}, median {np.median(values):g}, {top}"
    return [
        row.node,
        row.op_type,
        "×".join(map(str, row.shape)),
        {"lpbq": f"LPBQ B{row.block_size} ({row.encoder})", "int8": "int8 per channel"}.get(
            row.status, f"fp32: {row.reason}"
        ),
        f"{row.sqnr_db:.2f}" if lpbq else "",
        f"{row.bits_per_weight:.3f}" if lpbq else "32",
        k,
        str(row.dead_channels) if lpbq else "",
    ]


LAYER_HEADERS = ["layer", "op", "weight shape", "status", "SQNR dB", "bits/weight", "k", "dead channels"]


SENSITIVITY_HEADERS = ["layer", "op", "weights", "model cosine (this layer alone at LPBQ)", "layer output SQNR dB"]


def _sensitivity_cells(row) -> list[str]:
    return [row.node, row.op_type, f"{row.weights:,}", f"{row.cosine:.5f}", f"{row.layer_sqnr_db:.2f}"]


def _summary_lines(report: ModelReport) -> list[str]:
    count = {status: sum(r.status == status for r in report.rows) for status in ("lpbq", "int8", "skipped")}
    lines = [
        f"Layers: {count['lpbq']} of {len(report.rows)} in LPBQ, {count['int8']} int8 per channel, "
        f"{count['skipped']} fp32; {report.quantized_share:.1%} of the weights at 4 bits.",
        f"Weights: {report.fp32_bytes / 1024:.1f} KiB fp32 → {report.lpbq_bytes / 1024:.1f} KiB "
        f"({report.fp32_bytes / max(report.lpbq_bytes, 1):.2f}× smaller, {report.bits_per_weight:.3f} bits/weight).",
    ]
    choice = report.precision
    if choice is not None:
        held = f", {choice.held_out_cosine:.5f} on held-out data" if choice.held_out_cosine is not None else ""
        lines.append(
            f"Precision: {choice.rule}. Int8 per channel: {', '.join(choice.int8_nodes) or 'none'}; output cosine "
            f"to fp32 {choice.cosine:.5f} on the calibration data{held} (all LPBQ {choice.all_lpbq[0]:.5f}, "
            f"all int8 {choice.all_int8[0]:.5f})."
        )
    for a in report.agreements:
        top1 = f", top-1 agreement {a.top1:.0%}" if a.top1 is not None else ""
        lines.append(
            f"Output '{a.output}', {a.mode} vs fp32: cosine {a.cosine:.5f}, max |diff| {a.max_abs_diff:.3g}{top1}."
        )
    return lines


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _html(report: ModelReport, pngs: Mapping[str, bytes]) -> str:
    layers = _html_table(LAYER_HEADERS, [layer_cells(row) for row in report.rows])
    sensitivity = ""
    if report.sensitivity:
        table = _html_table(SENSITIVITY_HEADERS, [_sensitivity_cells(row) for row in report.sensitivity])
        sensitivity = f"<h2>Sensitivity (calibration data), worst first</h2>\n{table}"
    images = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>'
        for name, data in pngs.items()
    )
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary_lines(report))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LPBQ report: {html.escape(report.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #eef3f8; }}
figure {{ display: inline-block; margin: 1em; }}
</style></head>
<body>
<h1>LPBQ report: {html.escape(report.name)}</h1>
<ul>{summary}</ul>
<h2>Layers</h2>
{layers}
{sensitivity}
<h2>Plots</h2>
{images}
</body></html>
"""


def _markdown(report: ModelReport, pngs: Mapping[str, bytes]) -> str:
    lines = [
        f"# LPBQ report: {report.name}",
        "",
        *[f"- {line}" for line in _summary_lines(report)],
        "",
        *_markdown_table(LAYER_HEADERS, [layer_cells(row) for row in report.rows]),
    ]
    if report.sensitivity:
        lines += ["", "## Sensitivity (calibration data), worst first", ""]
        lines += _markdown_table(SENSITIVITY_HEADERS, [_sensitivity_cells(row) for row in report.sensitivity])
    lines += ["", *[f"![{name}]({name})" for name in pngs], ""]
    return "\n".join(lines)


def write_report(report: ModelReport, directory: str | PathLike, *, overwrite: bool = False) -> Path:
    """``index.html``, ``report.md`` and the plot PNGs in ``directory`` (written whole or not at all)."""
    pngs = _plots(report)

    def fill(staging: Path) -> None:
        for name, data in pngs.items():
            (staging / name).write_bytes(data)
        (staging / "index.html").write_text(_html(report, pngs), encoding="utf-8")
        (staging / "report.md").write_text(_markdown(report, pngs), encoding="utf-8")

    return atomic_directory(directory, fill, overwrite=overwrite)
