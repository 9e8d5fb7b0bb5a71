"""What a parallel loop costs to start: an elementwise block (``a + 2 b``, float32) of n elements, one serial
vectorised loop against the same loop parallel over its rows, at a given thread count.

The schedule rules run a block parallel only from ``MIN_PARALLEL`` iterations
(``lpbq_tvm.kernels.schedule_rules``); this measures the size from which a parallel loop pays for
starting the thread pool's tasks. Timed by TVM's ``time_evaluator`` (medians of 7 repeats of 2,000
calls; no Python between calls), the host CPU recorded.

    python benchmarks/bench_parallel.py [--threads 2]   # needs only the package
"""

from __future__ import annotations

import argparse
import os

SIZES = (576, 4096, 8192, 16384, 32768, 65536, 262144)  # elements (rows of 64)


def block(n: int, parallel: bool):
    """``c = a + 2 b`` over ``[n / 64, 64]``: the rows serial or parallel, each row one vectorised loop."""
    from tvm import te
    from tvm.s_tir import Schedule

    a, b = te.placeholder((n // 64, 64), "float32", "a"), te.placeholder((n // 64, 64), "float32", "b")
    c = te.compute(a.shape, lambda i, j: a[i, j] + b[i, j] * 2.0, name="c")
    sch = Schedule(te.create_prim_func([a, b, c]))
    rows, lanes = sch.get_loops(sch.get_sblock("c"))
    if parallel:
        sch.parallel(rows)
    sch.vectorize(lanes)
    return sch.mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="TVM_NUM_THREADS (default %(default)s)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    import numpy as np
    import tvm
    from rich.console import Console
    from rich.table import Table

    from lpbq_tvm.targets import get_target
    from lpbq_tvm.timing import host_cpu

    target, device = get_target("cpu").tvm_target(), tvm.cpu()
    table = Table(title=f"a + 2 b, float32: µs per call at TVM_NUM_THREADS={args.threads} (median)")
    for column in ("elements", "serial", "parallel", "parallel / serial"):
        table.add_column(column, justify="right")
    for n in SIZES:
        arrays = [tvm.runtime.tensor(np.ones((n // 64, 64), "float32"), device) for _ in range(3)]
        times = []
        for parallel in (False, True):
            timer = tvm.compile(block(n, parallel), target).mod.time_evaluator("main", device, number=2000, repeat=7)
            times.append(float(np.median(timer(*arrays).results)) * 1e6)
        table.add_row(str(n), f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[1] / times[0]:.2f}")
    host = host_cpu()
    Console().print(f"host: {host['model']} (LLVM {host['llvm_cpu']}, {host['cores']} cores)")
    Console().print(table)


if __name__ == "__main__":
    main()
