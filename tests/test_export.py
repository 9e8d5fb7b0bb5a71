"""The exporter registry: the API and the CLI read the same formats; an export asks for what it needs."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.cli import build_parser
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import EXPORTERS, export


def _choices(command: str, option: str) -> list[str]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in subparsers.choices[command]._actions if option in a.option_strings).choices


def test_the_cli_offers_exactly_the_registered_formats():
    assert list(_choices("export", "--format")) == list(EXPORTERS)
    assert all(exporter.name == name and exporter.summary for name, exporter in EXPORTERS.items())


def test_an_export_names_what_is_missing(tmp_path):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    with pytest.raises(RuntimeError, match=r"no encodings yet: call sim.compute_encodings\(\) first"):
        export(sim, tmp_path / "m.encodings", "aimet-json")
    sim.compute_encodings()
    with pytest.raises(ValueError, match="unknown export format 'onnx'; known: aimet-json, qnn-onnx, ort-onnx"):
        export(sim, tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match="the QNN export quantizes activations: calibrate"):
        export(sim, tmp_path / "m.onnx", "qnn-onnx")
    assert not list(tmp_path.iterdir())  # nothing written on the way


def test_the_bundle_format_runs_its_build_once_before_writing(tmp_path):
    sim = QuantizationSimModel(build_example_model())
    set_grouped_blockwise_quantization_for_weights(sim)
    sim.compute_encodings()
    x = {"x": np.random.default_rng(0).standard_normal((1, 64, 8, 8)).astype(np.float32)}
    report = export(sim, tmp_path / "bundle", "tvm", sample_inputs=x)
    assert report.checks["run"] == "ran on the sample inputs here, outputs finite"
    assert "target cpu, mode weight-only" in report.checks["bundle"]
    assert report.bytes == sum(p.stat().st_size for p in (tmp_path / "bundle").iterdir())
