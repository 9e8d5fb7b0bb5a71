"""LPBQ dense kernels through the product's own path, side by side with onnxruntime's 4-bit kernels.

For each weight shape N x K (block 64) and batch M, a one-MatMul ONNX model is quantized with
LPBQ, compiled with ``lpbq_tvm.compile`` for the host CPU (weight-only, and W4A8 calibrated on the
input) and run with ``CompiledModel.run``; onnxruntime runs the fp32 model and the project's own
``ort-onnx`` export, whose LPBQ MatMul it fuses into ``MatMulNBits`` (accuracy_level 0: fp32
compute, like weight-only; 4: int8 compute, like W4A8). Each thread count runs in its own process
(``TVM_NUM_THREADS`` and onnxruntime's intra-op threads); both sides are timed through Python.

    python benchmarks/bench_kernels.py [--quick]      # needs the test extra (onnxruntime)
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

SHAPES = ((4096, 4096), (768, 3072), (3072, 768), (1536, 384))  # (N, K)
BATCHES = (1, 32)


def worker(threads: int, quick: bool) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import lpbq_tvm
    from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
    from lpbq_tvm.bench import time_ms
    from lpbq_tvm.export import export_onnx

    repeat = 10 if quick else 40
    rng = np.random.default_rng(0)
    for n, k in SHAPES[:1] if quick else SHAPES:
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        for m in BATCHES:
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                "mm",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                [numpy_helper.from_array(weight, "w")],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            x = {"x": rng.standard_normal((m, k)).astype(np.float32)}
            sim = QuantizationSimModel(model)
            set_grouped_blockwise_quantization_for_weights(sim, block_size=64)
            sim.compute_encodings(lambda s, data: s.run(data), x)
            rows = {}
            for mode in ("weight-only", "w4a8"):
                compiled = lpbq_tvm.compile(sim, mode=mode)
                rows[f"lpbq_tvm {mode}"] = time_ms(functools.partial(compiled.run, x), repeat).median_ms

            def session(proto, **config):
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.log_severity_level = 3
                for key, value in config.items():
                    options.add_session_config_entry(key, value)
                return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

            rows["onnxruntime fp32"] = time_ms(functools.partial(session(model).run, None, x), repeat).median_ms
            with tempfile.TemporaryDirectory() as scratch:
                export_onnx(sim, f"{scratch}/m.onnx", "ort", sample_inputs=x)
                exported = onnx.load(f"{scratch}/m.onnx")
            for level in (0, 4):
                nbits = session(exported, **{"session.qdq_matmulnbits_accuracy_level": str(level)})
                rows[f"onnxruntime MatMulNBits acc{level}"] = time_ms(
                    functools.partial(nbits.run, None, x), repeat
                ).median_ms
            print("ROW " + json.dumps({"shape": f"{n}x{k}", "M": m, "threads": threads, **rows}), flush=True)


def main() -> None:
    if "--worker" in sys.argv:
        worker(int(sys.argv[sys.argv.index("--worker") + 1]), "--quick" in sys.argv)
        return
    from rich.console import Console
    from rich.table import Table

    results = []
    for threads in (1, 2):
        command = [sys.executable, __file__, "--worker", str(threads), *(["--quick"] if "--quick" in sys.argv else [])]
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results += [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    names = [key for key in results[0] if key not in ("shape", "M", "threads")]
    table = Table(title="Dense N x K, block 64: median ms (ratio to MatMulNBits: weight-only vs acc0, w4a8 vs acc4)")
    for column in ("shape", "M", "threads", *names, "wo / acc0", "w4a8 / acc4"):
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(
            row["shape"],
            str(row["M"]),
            str(row["threads"]),
            *[f"{row[n]:.3f}" for n in names],
            f"{row['lpbq_tvm weight-only'] / row['onnxruntime MatMulNBits acc0']:.2f}",
            f"{row['lpbq_tvm w4a8'] / row['onnxruntime MatMulNBits acc4']:.2f}",
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
