"""Scale: a synthetic 1.1 B-parameter Llama decoder (TinyLlama-1.1B's shapes, seeded random weights, 4.4 GB of
fp32 in an external-data file) through the whole decoder flow on the host CPU, with the time and the peak
resident memory of each stage:

1. import: ``lpbq_tvm.llm.decoder_sim`` (graph preparation and the Relax import at the prefill shapes);
2. encode: ``set_grouped_blockwise_quantization_for_weights`` (every MatMul, the LM head included; block 64)
   and ``compute_encodings`` (w4a8 / w4a16 calibrate on two batches of random tokens, as the weights are random);
3. compile: ``compile_decoder`` (the prefill graph, then the decode graph imported again at its shapes, both
   lowered to the target's LPBQ kernels and built, one copy of the weights);
4. prefill 16 tokens, then 10 decode steps, with the simulation released first (what a deployed generator
   holds).

Each stage's peak is sampled every 10 ms (psutil) in a worker process of its own, so the model build (a
separate process, reported apart) does not count. After the run the worker reports what the generator holds:
its weight bytes (packed LPBQ and fp32), whether any fp32 copy of a lowered weight is among them, and the
resident set before and after returning freed heap pages to the system (glibc ``malloc_trim``: what the
allocator keeps of freed compile-time memory is reusable by the process but counts as resident).

    python benchmarks/bench_llm_scale.py [--mode weight-only] [--layers N] [--json rows.json]

``--layers`` keeps TinyLlama's widths with fewer layers (a quicker look). ``TVM_NUM_THREADS`` is set to 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # benchmarks.models is imported from the source tree
CACHE = Path.home() / ".cache" / "lpbq_tvm" / "models"
PREFILL, CONTEXT, STEPS = 16, 64, 10


class PeakSampler:
    """The process's resident set, sampled every 10 ms on a thread: the peak since :meth:`reset`."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._lock = threading.Lock()
        self.peak = self.now()
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        return self._process.memory_info().rss

    def reset(self) -> None:
        with self._lock:
            self.peak = self.now()

    def _sample(self) -> None:
        while True:
            with self._lock:
                self.peak = max(self.peak, self.now())
            time.sleep(0.01)


def model_path(layers: int) -> Path:
    return CACHE / f"synthetic-llama-1.1b-{layers}-layers" / "model.onnx"


def build(layers: int) -> None:
    """The synthetic decoder at :func:`model_path` (run in its own process)."""
    import dataclasses

    from benchmarks.models.llama_onnx import LlamaConfig, build_decoder, random_weights

    config = dataclasses.replace(LlamaConfig.tinyllama_1b(), layers=layers)
    build_decoder(config, random_weights(config), model_path(layers))


def worker(layers: int, mode: str) -> None:
    """The stages on the built model; prints one ROW line of JSON per stage and one for what the generator holds."""
    import gc

    import numpy as np

    from benchmarks.models.llama_onnx import LlamaConfig
    from lpbq_tvm.llm import DecoderInterface, compile_decoder, decoder_sim
    from lpbq_tvm.modes import needs_calibration
    from lpbq_tvm.quantsim import set_grouped_blockwise_quantization_for_weights
    from lpbq_tvm.timing import host_cpu

    sampler = PeakSampler()

    def stage(name: str, run: Callable[[], object]):
        sampler.reset()
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        emit({"kind": "stage", "stage": name, "seconds": seconds, "peak": sampler.peak, "after": sampler.now()})
        return result

    def simulated():
        sim = decoder_sim(model_path(layers), PREFILL)
        set_grouped_blockwise_quantization_for_weights(sim, op_types=("MatMul",), block_size=64)
        return sim

    def encode(sim) -> None:
        if not needs_calibration(mode):
            sim.compute_encodings()
        else:  # random tokens: the weights are random too
            interface = DecoderInterface.of(sim)
            batches = [interface.token_inputs(list(rng.integers(0, vocab, PREFILL))) for _ in range(2)]
            sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)

    def compiled():  # the simulation is released on return, as a deployed generator holds none
        sim = stage("import", simulated)
        stage("encode", lambda: encode(sim))
        decoder = stage("compile", lambda: compile_decoder(sim, mode, context=CONTEXT, prefill=PREFILL))
        return decoder, set(sim.encodings)

    rng, vocab = np.random.default_rng(0), LlamaConfig.tinyllama_1b().vocab
    decoder, lowered = compiled()
    gc.collect()
    tokens = [int(t) for t in rng.integers(0, vocab, PREFILL)]
    stage(f"prefill {PREFILL}", lambda: decoder.prefill(tokens))
    stage(f"{STEPS} decode steps", lambda: [decoder.step(tokens[i]) for i in range(STEPS)])
    held = decoder.decode_model.weight_bytes
    resident = sampler.now()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    emit(
        {
            "kind": "held",
            "packed": held.lpbq_packed,
            "float": held.float,
            "fp32_lowered": sorted(lowered & set(decoder.decode_model.param_names)),
            "resident": resident,
            "trimmed": sampler.now(),
            "host": host_cpu(),
        }
    )


def emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def run_rows(command: list[str]) -> list[dict]:
    """A subprocess of this script; its ROW lines (its stderr reaches the terminal)."""
    env = dict(os.environ, TVM_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, *command], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]


def main() -> None:
    from lpbq_tvm.modes import LPBQ_MODES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="weight-only", choices=tuple(LPBQ_MODES))
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (TinyLlama-1.1B: 22)")
    parser.add_argument("--json", type=Path, help="write the rows (stages, what the generator holds, host) here")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # the build process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.build:
        build(args.layers)
        return
    if args.worker:
        worker(args.layers, args.mode)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = []
    if not model_path(args.layers).exists():
        with console.status(f"building the synthetic decoder ({args.layers} layers) into {model_path(args.layers)}"):
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", "--layers", str(args.layers)], check=True)
            rows.append({"kind": "build", "seconds": time.perf_counter() - start})
    rows += run_rows(["--worker", "--layers", str(args.layers), "--mode", args.mode])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    gib = 2**30
    table = Table(title=f"synthetic Llama, TinyLlama-1.1B widths, {args.layers} layers, {args.mode}, 1 thread")
    for column in ("stage", "seconds", "peak GiB", "resident after GiB"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    stages = [row for row in rows if row["kind"] == "stage"]
    for row in stages:
        table.add_row(row["stage"], f"{row['seconds']:.1f}", f"{row['peak'] / gib:.2f}", f"{row['after'] / gib:.2f}")
    table.add_row("all", f"{sum(r['seconds'] for r in stages):.1f}", f"{max(r['peak'] for r in stages) / gib:.2f}", "")
    console.print(table)
    held = next(row for row in rows if row["kind"] == "held")
    host = held["host"]
    console.print(f"host: {host['model']} (LLVM {host['llvm_cpu']}, {host['cores']} cores)")
    console.print(
        f"the generator holds {held['packed'] / 2**20:.0f} MiB of packed LPBQ weights and {held['float'] / 2**20:.0f} "
        f"MiB of fp32 ones; fp32 copies of lowered weights: {len(held['fp32_lowered']) or 'none'}; resident "
        f"{held['resident'] / gib:.2f} GiB, {held['trimmed'] / gib:.2f} GiB once freed heap pages are returned"
    )
    if any(row["kind"] == "build" for row in rows):
        console.print(f"model build (its own process, not in the table): {rows[0]['seconds']:.0f} s")


if __name__ == "__main__":
    main()
