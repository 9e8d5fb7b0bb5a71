"""Where a decoder's time goes: each compiled function's share of a SmolLM2-135M prefill or decode step.

The Relax VM's instrument hook times every call of one graph (kernels and VM builtins, by function name) over a
few runs; the table lists them by total time per run, with the run's plain (uninstrumented) time above it. The
hook adds its own cost to each call (a Python callback), so the shares of the many cheap builtin calls
(``vm.builtin.alloc_tensor``, ``reshape``, ...) are inflated; the kernels' are not. Use it to find what to
optimise, then measure the change with ``bench_llm.py``.

    python benchmarks/profile_llm.py MODE [--phase decode|prefill] [--context 64] [--prefill 16] [--top 25]
    TVM_NUM_THREADS=1 python benchmarks/profile_llm.py weight-only --phase prefill --context 512 --prefill 256

The model is the one ``bench_llm.py`` measures (``bench_llm.calibrated_sim``: every MatMul LPBQ, calibrated on
the same windows of *Opticks*). Needs the bench and llm extras; the model is converted once into the cache by
``benchmarks/models/smollm2.py``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.models from the source tree

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.bench_llm import calibrated_sim  # noqa: E402
from lpbq_tvm.llm import compile_decoder  # noqa: E402
from lpbq_tvm.modes import LPBQ_MODES  # noqa: E402

RUNS = {"decode": 20, "prefill": 3}


def profile(decoder, phase: str, prefill: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """(plain ms per run, {function: (ms per run, calls per run)}) of ``phase``."""
    prompt = list(range(1, prefill + 1))
    if phase == "prefill":
        run, machine = (lambda: decoder.prefill(prompt)), decoder.prefill_model._machine()
    else:
        decoder.prefill(prompt[: max(prefill // 2, 1)])
        start = decoder.length

        def run():
            decoder.length = start
            decoder.step(5)

        machine = decoder.decode_model._machine()
    runs = RUNS[phase]
    for _ in range(2):
        run()
    begin = time.perf_counter()
    for _ in range(runs):
        run()
    plain = (time.perf_counter() - begin) / runs * 1e3
    totals, calls, started = collections.defaultdict(float), collections.Counter(), {}

    def instrument(_func, name, before, _ret, *_args):
        if before:
            started[name] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - started[name]
            calls[name] += 1
        return 0

    machine.set_instrument(instrument)
    for _ in range(runs):
        run()
    machine.set_instrument(None)
    return plain, {name: (totals[name] / runs * 1e3, calls[name] // runs) for name in totals}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["fp32", *LPBQ_MODES])
    parser.add_argument("--phase", choices=sorted(RUNS), default="decode")
    parser.add_argument("--context", type=int, default=64, help="cache slots of the decode graph")
    parser.add_argument("--prefill", type=int, default=16, help="positions of the prefill graph")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args(argv)
    console = Console()
    with console.status(f"compiling SmolLM2 in {args.mode} (context {args.context}, prefill {args.prefill})"):
        decoder = compile_decoder(calibrated_sim(), args.mode, context=args.context, prefill=args.prefill)
    with console.status(f"profiling {args.phase}"):
        plain, functions = profile(decoder, args.phase, args.prefill)
    instrumented = sum(ms for ms, _ in functions.values())
    table = Table(title=f"{args.mode} {args.phase}: {plain:.2f} ms per run ({instrumented:.2f} ms in timed calls)")
    for column in ("function", "ms per run", "share", "calls per run"):
        table.add_column(column, justify="left" if column == "function" else "right", overflow="fold")
    for name, (ms, count) in sorted(functions.items(), key=lambda item: -item[1][0])[: args.top]:
        table.add_row(name, f"{ms:.3f}", f"{ms / instrumented:.1%}", str(count))
    console.print(table)


if __name__ == "__main__":
    main()
