"""Model benchmark: onnxruntime fp32, TVM fp32 and TVM LPBQ per mode, side by side in one process.

Latency is the median (and spread: min / max) of warm runs; the candidates run in turn, a few calls
each per round (:func:`lpbq_tvm.timing.time_interleaved`), so a slow phase of a shared host hits all of them alike
instead of whichever ran during it. Compile time and weight bytes come with it. Set the thread
count before TVM runs anything: TVM's pool reads ``TVM_NUM_THREADS`` when it starts
(:func:`set_threads`).

:func:`benchmark_remote` times the same TVM builds on a device of a TVM RPC tracker instead
(bundles uploaded by :func:`lpbq_tvm.remote.run_remote`, timed there by TVM's time evaluator);
onnxruntime is not measured there, and the device's own thread setting applies.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lpbq_tvm.compiler import compile as compile_model
from lpbq_tvm.remote import run_remote
from lpbq_tvm.timing import Timing, time_interleaved

__all__ = ["ModelBenchmark", "set_threads", "benchmark_model", "benchmark_remote"]


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


def _compile_all(sim, modes: Sequence[str], target: str = "cpu") -> tuple[dict, dict[str, float]]:
    """fp32 and each mode compiled for ``target``, with the seconds each compile took."""
    compiled, seconds = {}, {}
    for mode in ("fp32", *modes):
        start = time.perf_counter()
        compiled[mode] = compile_model(sim, target=target, mode=mode)
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
