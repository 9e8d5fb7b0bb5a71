"""Model benchmark: onnxruntime fp32, TVM fp32 and TVM LPBQ per mode, side by side in one process.

Latency is the median (and spread: min / max) of warm runs; the candidates run in turn, a few calls
each per round (:func:`time_interleaved`), so a slow phase of a shared host hits all of them alike
instead of whichever ran during it. Compile time and weight bytes come with it. Set the thread
count before TVM runs anything: TVM's pool reads ``TVM_NUM_THREADS`` when it starts
(:func:`set_threads`).

:func:`benchmark_remote` times the same TVM builds on a device of a TVM RPC tracker instead
(bundles uploaded by :func:`lpbq_tvm.remote.run_remote`, timed there by TVM's time evaluator);
onnxruntime is not measured there, and the device's own thread setting applies.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Timing", "ModelBenchmark", "set_threads", "time_interleaved", "benchmark_model", "benchmark_remote"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class ModelBenchmark:
    threads: int | None  # None: the remote device's own setting
    onnxruntime_fp32: Timing | None  # None on a remote device
    tvm: dict[str, Timing]  # mode ("fp32", "weight-only", "w4a8", ...) -> latency
    compile_seconds: dict[str, float]
    weight_bytes: dict[str, int]


_ONNXRUNTIME = "onnxruntime fp32"  # its key among the interleaved candidates


def set_threads(threads: int) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)


SETTLE_SECONDS = 0.15  # before each burst: the thread pools the previous candidate left spinning go idle
WARM_SECONDS = 0.01  # untimed calls before each burst, at least one: the core is back at speed after the pause


def time_interleaved(functions: Mapping[str, Callable[[], object]], repeat: int, burst: int = 5) -> dict[str, Timing]:
    """Each function's latency over about ``repeat`` calls, taken in rounds: a round runs every
    function in turn, starting one further along the list each round, for untimed calls over
    ``WARM_SECONDS`` (at least one) and then ``burst`` timed ones. A slow phase of a shared host thus
    hits every candidate alike, while each timed call runs warm (its weights back in cache, its
    thread pool awake, the core at speed), as a loop over the same layer would. Each burst starts
    ``SETTLE_SECONDS`` after the previous one: with two threads on two cores, a candidate timed
    while another runtime's pool still spins waited for a core (4096² M = 1, 0.65 ms kernels took
    8 ms); after such a pause one untimed call was not enough for a 0.15 ms model (timed 2x slower).
    After its last call TVM's worker spins for 80-100 ms and onnxruntime's for 50-60 ms (CPU time
    of each thread, Zen 1, 2 threads): with 50 ms, onnxruntime ran the example at 2 threads in
    0.28 ms instead of its 0.16 in a process of its own, and 0.16 with 150 ms."""
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


def _compile_all(sim, modes: Sequence[str], target: str = "cpu") -> tuple[dict, dict[str, float]]:
    """fp32 and each mode compiled for ``target``, with the seconds each compile took."""
    import lpbq_tvm

    compiled, seconds = {}, {}
    for mode in ("fp32", *modes):
        start = time.perf_counter()
        compiled[mode] = lpbq_tvm.compile(sim, target=target, mode=mode)
        seconds[mode] = time.perf_counter() - start
    return compiled, seconds


def benchmark_model(
    sim, inputs: Mapping[str, np.ndarray], modes: Sequence[str], repeat: int = 20, threads: int = 1
) -> ModelBenchmark:
    """Compile ``sim`` as fp32 and in each mode for the host CPU, and time all of them on ``inputs``."""
    import onnxruntime as ort

    compiled, seconds = _compile_all(sim, modes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(sim.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = {mode: (lambda m=model: m.run(inputs)) for mode, model in compiled.items()}
    timings = time_interleaved({**runs, _ONNXRUNTIME: lambda: session.run(None, dict(inputs))}, repeat)
    return ModelBenchmark(
        threads=threads,
        onnxruntime_fp32=timings.pop(_ONNXRUNTIME),
        tvm=timings,
        compile_seconds=seconds,
        weight_bytes={mode: model.weight_bytes.total for mode, model in compiled.items()},
    )


def benchmark_remote(
    sim,
    inputs: Mapping[str, np.ndarray],
    modes: Sequence[str],
    tracker: str,
    key: str,
    *,
    target: str = "cpu",
    repeat: int = 20,
    timeout: float = 60.0,
) -> ModelBenchmark:
    """Compile ``sim`` as fp32 and in each mode for ``target`` and time each build on a ``key``
    device of the RPC ``tracker`` (host:port). Raises as :func:`lpbq_tvm.remote.run_remote` does."""
    from lpbq_tvm.remote import run_remote

    compiled, seconds = _compile_all(sim, modes, target)
    timings = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, model in compiled.items():
            bundle = model.export_bundle(os.path.join(scratch, mode))
            timings[mode] = run_remote(bundle, tracker, key, inputs, timeout=timeout, repeat=repeat).timing
    return ModelBenchmark(
        threads=None,
        onnxruntime_fp32=None,
        tvm=timings,
        compile_seconds=seconds,
        weight_bytes={mode: model.weight_bytes.total for mode, model in compiled.items()},
    )
