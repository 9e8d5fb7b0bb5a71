"""Encoder speed: LPBQ encoding of a 4096x4096 weight and of every weight of the example model.

Run: ``python benchmarks/bench_encoder.py``. numpy is single-threaded for these element-wise
operations; the figure to beat is 0.5 s for the 16.8 M weights on one core.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
from rich.console import Console
from rich.table import Table

from lpbq_tvm.encoder import encode_lpbq
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.onnx_layers import find_weight_layers


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((4096, 4096)).astype(np.float32)
    cases = [
        ("4096x4096 out x in (Gemm transB=1)", big, 0, 1),
        ("4096x4096 in x out (MatMul)", big, 1, 0),
    ]
    cases += [
        (f"example {layer.node_name} {layer.weight.shape}", layer.weight, layer.channel_axis, layer.block_axis)
        for layer in find_weight_layers(build_example_model())
    ]
    table = Table(title="LPBQ encoder, block size 64, best of 5")
    for column in ("weight", "weights", "seconds", "M weights/s"):
        table.add_column(column, justify="left" if column == "weight" else "right")
    for label, weight, channel_axis, block_axis in cases:
        seconds = best_of(5, partial(encode_lpbq, weight, channel_axis, block_axis, block_size=64))
        table.add_row(label, f"{weight.size:,}", f"{seconds:.4f}", f"{weight.size / seconds / 1e6:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
