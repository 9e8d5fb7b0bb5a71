"""LPBQ dense kernels through the product's own path, side by side with onnxruntime's 4-bit kernels.

For each weight shape N x K (block 64) and batch M, a one-MatMul ONNX model is quantized with
LPBQ, compiled with ``lpbq_tvm.compile`` for the host CPU (weight-only, and W4A8 calibrated on the
input) and run with ``CompiledModel.run``; onnxruntime runs the fp32 model and the project's own
``ort-onnx`` export, whose LPBQ MatMul it fuses into ``MatMulNBits`` (accuracy_level 0: fp32
compute, like weight-only; 4: int8 compute, like W4A8). Beside them: the same MatMul compiled by
``lpbq_tvm.compile`` in fp32 (TVM's lowering with the project's CPU schedules), numpy fp32 (its BLAS
held to one thread), and the bandwidth bound: the layer's packed weight bytes read at the rate
numpy reduces an array of the same size (warm, like the kernels' weights between runs).

Each thread count runs in its own process (``TVM_NUM_THREADS`` and onnxruntime's intra-op
threads; numpy and the bound stay on one thread); everything is timed through Python, in rounds of
a few warm calls per candidate (``lpbq_tvm.timing.time_interleaved``: a slow phase of a shared host
hits them all alike), and the table shows the median with the min-max spread.

Every row records the host's CPU (model, flags, LLVM's name for it: ``lpbq_tvm.timing.host_cpu``);
``--json FILE`` writes the rows so that results of different hosts can be compared.

    python benchmarks/bench_kernels.py [--quick] [--json rows.json]   # needs the test extra (onnxruntime)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = ((4096, 4096), (768, 3072), (3072, 768), (1536, 384))  # (N, K)
BATCHES = (1, 32)


def worker(threads: int, quick: bool) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from dense_layer import dense_layer

    import lpbq_tvm
    from lpbq_tvm.export import export
    from lpbq_tvm.timing import host_cpu, time_interleaved

    repeat = 10 if quick else 40
    rng = np.random.default_rng(0)
    for n, k in SHAPES[:1] if quick else SHAPES:
        for m in BATCHES:
            model, weight, x, sim = dense_layer(n, k, m, rng)
            candidates = {}
            for mode in ("weight-only", "w4a8", "fp32"):
                compiled = lpbq_tvm.compile(sim, mode=mode)
                candidates[f"lpbq_tvm {mode}"] = functools.partial(compiled.run, x)
                if mode == "w4a8":
                    weight_bytes = compiled.weight_bytes.total
            candidates["numpy fp32"] = functools.partial(np.matmul, x["x"], weight)
            candidates["bound"] = weight_read(weight_bytes)

            def session(proto, **config):
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.log_severity_level = 3
                for key, value in config.items():
                    options.add_session_config_entry(key, value)
                return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

            candidates["onnxruntime fp32"] = functools.partial(session(model).run, None, x)
            with tempfile.TemporaryDirectory() as scratch:
                export(sim, f"{scratch}/m.onnx", "ort-onnx", sample_inputs=x)
                exported = onnx.load(f"{scratch}/m.onnx")
            for level in (0, 4):
                nbits = session(exported, **{"session.qdq_matmulnbits_accuracy_level": str(level)})
                candidates[f"onnxruntime MatMulNBits acc{level}"] = functools.partial(nbits.run, None, x)
            timings = time_interleaved(candidates, repeat)
            timings = {name: [t.median_ms, t.min_ms, t.max_ms] for name, t in timings.items()}
            row = {"shape": f"{n}x{k}", "M": m, "threads": threads, "host": host_cpu(), **timings}
            print("ROW " + json.dumps(row), flush=True)


def weight_read(nbytes: int):
    """A read of ``nbytes`` kept warm: the faster of two numpy reductions of such an array."""
    import numpy as np

    from lpbq_tvm.timing import time_interleaved

    array = np.ones(-(-nbytes // 8), dtype=np.uint64)
    reads = {
        "bitwise_or": functools.partial(np.bitwise_or.reduce, array),
        "max": functools.partial(np.max, array.view(np.float32)),
    }
    timings = time_interleaved(reads, repeat=10)
    return reads[min(timings, key=lambda name: timings[name].median_ms)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 4096 x 4096 layer only, fewer calls")
    parser.add_argument("--json", type=Path, help="write the rows (timings and host CPU) to this file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one thread count, in its own process
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.quick)
        return
    from rich.console import Console
    from rich.table import Table

    results = []
    for threads in (1, 2):
        command = [sys.executable, __file__, "--worker", str(threads), *(["--quick"] if args.quick else [])]
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        # stderr is not captured: the worker's warnings and errors reach the terminal
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
        results += [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    names = [key for key in results[0] if key not in ("shape", "M", "threads", "host")]
    times = Table(title="Dense N x K, block 64: median ms (min-max)")
    ratios = Table(title="Ratios of medians (below 1: lpbq_tvm faster)")
    ratio_columns = {
        "wo / acc0": ("lpbq_tvm weight-only", "onnxruntime MatMulNBits acc0"),
        "wo / acc4": ("lpbq_tvm weight-only", "onnxruntime MatMulNBits acc4"),
        "wo / ort fp32": ("lpbq_tvm weight-only", "onnxruntime fp32"),
        "wo / bound": ("lpbq_tvm weight-only", "bound"),
        "w4a8 / acc4": ("lpbq_tvm w4a8", "onnxruntime MatMulNBits acc4"),
        "w4a8 / bound": ("lpbq_tvm w4a8", "bound"),
    }
    speedups = ("wo speedup vs 1 thread", "w4a8 speedup vs 1 thread")
    for table, columns in ((times, names), (ratios, [*ratio_columns, *speedups])):
        for column in ("shape", "M", "threads", *columns):
            table.add_column(column, justify="right")
    one_thread = {(row["shape"], row["M"]): row for row in results if row["threads"] == 1}
    for row in results:
        key = (row["shape"], str(row["M"]), str(row["threads"]))
        times.add_row(*key, *[f"{row[n][0]:.3f} ({row[n][1]:.3f}-{row[n][2]:.3f})" for n in names])
        single = one_thread[row["shape"], row["M"]]
        ratios.add_row(
            *key,
            *[f"{row[a][0] / row[b][0]:.2f}" for a, b in ratio_columns.values()],
            *[f"{single[n][0] / row[n][0]:.2f}x" for n in ("lpbq_tvm weight-only", "lpbq_tvm w4a8")],
        )
    console = Console(width=240)
    host = results[0]["host"]
    console.print(f"host: {host['model']} (LLVM {host['llvm_cpu']}, {host['cores']} cores)")
    console.print(times)
    console.print(ratios)


if __name__ == "__main__":
    main()
