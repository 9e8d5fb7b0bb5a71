"""How lpbq_tvm times things: warm calls in interleaved bursts, reported as median, min and max, and
on what (:func:`host_cpu`: a ratio measured on one CPU says nothing about another).

Used by the model benchmark (:mod:`lpbq_tvm.bench`), the benchmark scripts and remote runs
(:mod:`lpbq_tvm.remote`, whose device times its calls with TVM's time evaluator).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Timing", "host_cpu", "time_interleaved"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float


# Before each burst: longer than the thread pools the previous candidate left spinning take to go idle.
SETTLE_SECONDS = 0.15
# Untimed calls before each burst, at least one: long enough after the pause for a decoder's step to run
# as fast as in a generation loop again (docs/performance.md, "Timing").
WARM_SECONDS = 0.1


def time_interleaved(functions: Mapping[str, Callable[[], object]], repeat: int, burst: int = 5) -> dict[str, Timing]:
    """Each function's latency over about ``repeat`` calls, taken in rounds: a round runs every
    function in turn, starting one further along the list each round, for untimed calls over
    ``WARM_SECONDS`` (at least one) and then ``burst`` timed ones. A slow phase of a shared host thus
    hits every candidate alike, while each timed call runs warm (its weights back in cache, its
    thread pool awake, the core at speed), as a loop over the same layer would. Each burst starts
    ``SETTLE_SECONDS`` after the previous one: with two threads on two cores, a candidate timed
    while another runtime's pool still spins waits for a core, and both TVM's and onnxruntime's
    workers keep spinning for a while after their last call (docs/performance.md measures how
    long). After such a pause one untimed call is not enough to bring a small model back to speed."""
    names = list(functions)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(max(1, round(repeat / burst))):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_SECONDS)
            warm_until = time.perf_counter() + WARM_SECONDS
            functions[name]()
            while time.perf_counter() < warm_until:
                functions[name]()
            for _ in range(burst):
                start = time.perf_counter()
                functions[name]()
                samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: Timing(statistics.median(s), min(s), max(s)) for name, s in samples.items()}


def host_cpu() -> dict[str, object]:
    """The CPU this process runs on, to record beside its measurements: the model and feature flags of
    ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``), LLVM's name for it (TVM's ``mcpu``), cores."""
    from tvm.target import codegen

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {
        "model": info.get("model name") or info.get("CPU part") or platform.processor() or "unknown",
        "flags": (info.get("flags") or info.get("Features") or "").split(),
        "llvm_cpu": str(codegen.llvm_get_system_cpu()),
        "cores": os.cpu_count(),
    }
