"""LPBQ GEMVs with their weights out of cache, as a decoder's step reads them: huge pages against 4 KiB pages.

A decode step reads each weight once per token, from memory; ``bench_kernels.py`` times a layer
warm (its weights in cache between calls), which hides what memory costs. Here each one-row
(M = 1) layer is compiled once by ``lpbq_tvm.compile`` and called on many copies of its weights in
turn, back to back (about 160 MB of them, far beyond the core's caches, as a decode step calls one
layer after another; a *pass* calls each copy once, and the table shows a call's share of it),
placed as ``lpbq_tvm.compile`` places them (one arena of transparent huge pages,
``lpbq_tvm.huge_pages``) and as TVM allocates them on its own (4 KiB pages); beside them, the same
layer warm (one copy), and one core's read rate over a 256 MB numpy array in huge and in 4 KiB
pages. Shapes: SmolLM2-135M's projections (k / v, q / o, up / gate, down) and LM head, and a 4096 x
4096 layer; block 64, every timing interleaved (``lpbq_tvm.timing.time_interleaved``). ``--threads``
sets ``TVM_NUM_THREADS`` (default 1; the read rates stay one core's).

    python benchmarks/bench_streaming.py [--threads 2] [--json rows.json]   # needs the test extra
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dense_layer

SHAPES = ((192, 576), (576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096))  # (N, K)
COLD_BYTES = 160e6  # weight copies cycled through per layer: beyond any cache of the hosts seen
READ_BYTES = 256 * 2**20
TIMED = ("warm", "huge pages", "4 KiB pages")


def one_pass(compiled, x, copies):
    """One call of ``compiled`` on input ``x`` (a tensor) with each of ``copies`` (weight lists), back to back:
    as a decode step calls each layer once, on weights no other layer shares."""

    def run():
        for weights in copies:
            compiled.params = weights
            compiled.invoke(x)

    return run


def layer_rows(rng, repeat: int):
    import tvm
    from dense_layer import dense_layer

    import lpbq_tvm
    from lpbq_tvm.huge_pages import huge_page_copies
    from lpbq_tvm.timing import time_interleaved

    for n, k in SHAPES:
        _, _, x, sim = dense_layer(n, k, 1, rng)
        for mode in ("weight-only", "w4a8"):
            compiled, tensor = lpbq_tvm.compile(sim, mode=mode).load(), tvm.runtime.tensor(x["x"])
            weights = [p.numpy() for p in compiled.params]
            count = max(2, int(COLD_BYTES // compiled.weight_bytes.total))
            small = [[tvm.runtime.tensor(w) for w in weights] for _ in range(count)]
            moved = iter(huge_page_copies([w for copy in small for w in copy]))  # one arena, as a model's weights
            huge = [[next(moved) for _ in copy] for copy in small]
            candidates = {
                "warm": one_pass(compiled, tensor, huge[:1] * count),
                "huge pages": one_pass(compiled, tensor, huge),
                "4 KiB pages": one_pass(compiled, tensor, small),
            }
            timings = time_interleaved(candidates, repeat)
            nbytes = compiled.weight_bytes.total
            row = {"shape": f"{n}x{k}", "mode": mode, "weight_bytes": nbytes, "copies": count}
            row |= {name: [t.median_ms / count, t.min_ms / count, t.max_ms / count] for name, t in timings.items()}
            yield row
            del candidates, small, huge


def read_rows(repeat: int):
    import numpy as np

    from lpbq_tvm.timing import time_interleaved

    arrays = {}
    for name, advise in (("huge pages", True), ("4 KiB pages", False)):
        np.core.multiarray._set_madvise_hugepage(advise)  # numpy advises its large arrays itself
        arrays[name] = np.ones(READ_BYTES // 8, dtype=np.uint64)
        arrays[name][:] = 1  # touched while the setting holds
    np.core.multiarray._set_madvise_hugepage(True)
    reads = {name: functools.partial(np.bitwise_or.reduce, array) for name, array in arrays.items()}
    timings = time_interleaved(reads, repeat)
    return {name: READ_BYTES / (t.median_ms / 1e3) / 1e9 for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows (timings, read rates, host CPU) to this file")
    parser.add_argument("--repeat", type=int, default=15, help="timed passes per candidate (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS of the layers (default 1)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts: before any call
    import warnings

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from lpbq_tvm.timing import host_cpu

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # np.core, for the read rates
    console = Console(width=160)
    host = host_cpu()
    console.print(f"host: {host['model']} (LLVM {host['llvm_cpu']}), TVM_NUM_THREADS={args.threads}")
    rates = read_rows(args.repeat)
    console.print("one core reads 256 MB (numpy): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items()))
    table = Table(title="M = 1, block 64: µs per call (pass / copies), median (min-max); GB/s of weights read")
    for column in ("shape", "mode", "MB", "warm", "huge pages", "4 KiB pages", "GB/s huge", "GB/s 4 KiB"):
        table.add_column(column, justify="right")
    rows = []
    with console.status("timing layers"):
        for row in layer_rows(np.random.default_rng(0), args.repeat):
            rows.append(row)
            cells = [f"{1e3 * t[0]:.1f} ({1e3 * t[1]:.1f}-{1e3 * t[2]:.1f})" for t in map(row.get, TIMED)]
            rate = [f"{row['weight_bytes'] / (row[n][0] / 1e3) / 1e9:.1f}" for n in TIMED[1:]]
            table.add_row(row["shape"], row["mode"], f"{row['weight_bytes'] / 1e6:.2f}", *cells, *rate)
    console.print(table)
    if args.json:
        record = {"host": host, "threads": args.threads, "read_gb_s": rates, "rows": rows}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
