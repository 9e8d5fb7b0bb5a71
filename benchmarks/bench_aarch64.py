"""Instructions per call of the aarch64 LPBQ kernels on the emulated board, beside TVM's default lowering
and onnxruntime's 4-bit MatMulNBits: a deterministic proxy for speed (wall time under emulation is not one).

For each weight shape N x K (block 64) and batch M, a one-MatMul ONNX model is quantized with LPBQ as in
``bench_kernels.py`` and built for ``aarch64``: ``lpbq_tvm.compile`` in weight-only, W4A8 and W4A16 and in
fp32 (the project's CPU pipeline), W4A8 and W4A16 also for ``aarch64-i8mm`` (``usmmla`` from four rows),
and the fp32 MatMul through TVM's own default pipeline (what TVM does without the project's schedules).
onnxruntime's aarch64 wheel (one thread) runs the project's ``ort-onnx`` export, which it fuses into
``MatMulNBits`` at accuracy level 0 (fp32 compute) and 4 (int8 compute).

Each runs on the board of ``tools/arm64_device.sh`` under its instruction-counting qemu plugin
(``tools/qemu_insn_count.c``) twice, with 1 call and with 1 + CALLS calls; the difference, divided by
CALLS, counted only inside the library that holds the kernel (the bundle's ``model.so``, onnxruntime's
``onnxruntime_pybind11_state`` library) is the instructions per call: identical from run to run, with
imports, loading and session setup left out. ``MAC/insn`` is M·N·K over that.

    python benchmarks/bench_aarch64.py [--quick] [--calls 2]   # as root, after tools/arm64_device.sh setup

``QEMU_CPU`` picks the emulated CPU (default ``max``: NEON, dotprod, i8mm); the table's title names it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from dense_layer import dense_layer

import lpbq_tvm
from lpbq_tvm.compiler import build, lower
from lpbq_tvm.export import export

SHAPES = ((4096, 4096), (768, 3072))  # (N, K)
BATCHES = (1, 32)
DEVICE = Path(__file__).resolve().parents[1] / "tools" / "arm64_device.sh"
BOARD_RUN = DEVICE.with_name("board_run.py")  # what runs on the board
ORT_LIBRARY = "onnxruntime_pybind11_state"
CANDIDATES = (
    "lpbq_tvm weight-only",
    "lpbq_tvm w4a8",
    "lpbq_tvm w4a16",
    "lpbq_tvm w4a8 i8mm",
    "lpbq_tvm w4a16 i8mm",
    "lpbq_tvm fp32",
    "TVM default fp32",
    "onnxruntime MatMulNBits acc0",
    "onnxruntime MatMulNBits acc4",
)
RATIOS = {
    "wo / acc0": ("lpbq_tvm weight-only", "onnxruntime MatMulNBits acc0"),
    "w4a8 / acc4": ("lpbq_tvm w4a8", "onnxruntime MatMulNBits acc4"),
    "w4a8 i8mm / acc4": ("lpbq_tvm w4a8 i8mm", "onnxruntime MatMulNBits acc4"),
    "w4a16 / acc0": ("lpbq_tvm w4a16", "onnxruntime MatMulNBits acc0"),
    "wo / TVM default": ("lpbq_tvm weight-only", "TVM default fp32"),
}


class Board:
    """The emulated board's rootfs, with a scratch folder in it that both sides see (host path, device path)."""

    def __init__(self) -> None:
        root = Path(
            subprocess.run(["bash", str(DEVICE), "root"], capture_output=True, text=True, check=True).stdout.strip()
        )
        self.host = Path(tempfile.mkdtemp(prefix="bench-", dir=root / "srv" / "work"))
        self.device = Path("/srv/work") / self.host.name
        shutil.copy(BOARD_RUN, self.host)

    def instructions(self, kind: str, path: str, calls: int, config: tuple[str, ...] = ()) -> float:
        """Instructions per call inside the kernel's library: (count at 1 + calls - count at 1) / calls."""
        counts = [self._count(kind, path, n, config) for n in (1, 1 + calls)]
        return (counts[1] - counts[0]) / calls

    def _count(self, kind: str, path: str, calls: int, config: tuple[str, ...]) -> int:
        library = ORT_LIBRARY if kind == "ort" else f"{self.device / path}/model.so"
        command = ["bash", str(DEVICE), "count", str(self.device / "counts.txt")]
        command += [str(self.device / BOARD_RUN.name), kind, str(self.device / path), str(self.device / "inputs.npz")]
        command += ["--calls", str(calls), "--maps", str(self.device / "maps.txt")]
        command += ["--config", *config] if config else []
        done = subprocess.run(command, capture_output=True, text=True)  # onnxruntime's cpuinfo complains of /sys
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        ranges = [
            tuple(int(a, 16) for a in line.split()[0].split("-"))
            for line in (self.host / "maps.txt").read_text().splitlines()
            if line.split()[1].startswith("r-x") and library in line
        ]
        if not ranges:
            raise RuntimeError(f"no executable mapping of {library} in the board process")
        total = 0
        for line in (self.host / "counts.txt").read_text().splitlines():
            vaddr, n_insns, executions = line.split()
            if any(low <= int(vaddr, 16) < high for low, high in ranges):
                total += int(n_insns) * int(executions)
        return total


def measure(board: Board, n: int, k: int, m: int, calls: int, rng: np.random.Generator) -> dict[str, float]:
    _, _, x, sim = dense_layer(n, k, m, rng)
    np.savez(board.host / "inputs.npz", **x)
    builds = {
        f"lpbq_tvm {mode}": lpbq_tvm.compile(sim, "aarch64", mode) for mode in ("weight-only", "w4a8", "w4a16", "fp32")
    }
    for mode in ("w4a8", "w4a16"):
        builds[f"lpbq_tvm {mode} i8mm"] = lpbq_tvm.compile(sim, "aarch64-i8mm", mode)
    builds["TVM default fp32"] = build(
        lower(sim, "aarch64", "fp32"), "aarch64", sim.inputs, sim.outputs, pipeline="default"
    )
    counts = {}
    for name, compiled in builds.items():
        folder = name.replace(" ", "-")
        compiled.export_bundle(board.host / folder, overwrite=True)
        counts[name] = board.instructions("tvm", folder, calls)
    export(sim, board.host / "ort.onnx", "ort-onnx", sample_inputs=x, overwrite=True)
    for level in (0, 4):
        config = (f"session.qdq_matmulnbits_accuracy_level={level}",)
        counts[f"onnxruntime MatMulNBits acc{level}"] = board.instructions("ort", "ort.onnx", calls, config)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 768 x 3072 layer only")
    parser.add_argument("--calls", type=int, default=2, help="calls counted beyond the first (default %(default)s)")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    board = Board()
    rng = np.random.default_rng(0)
    cpu = os.environ.get("QEMU_CPU", "max")
    counts = Table(title=f"aarch64 (qemu {cpu}), dense N x K, block 64: instructions per call, millions (MAC/insn)")
    ratios = Table(title="Ratios of instructions per call (below 1: lpbq_tvm executes fewer)")
    for table, columns in ((counts, CANDIDATES), (ratios, RATIOS)):
        for column in ("shape", "M", *columns):
            table.add_column(column, justify="right")
    try:
        for n, k in SHAPES[1:] if args.quick else SHAPES:
            for m in BATCHES:
                row = measure(board, n, k, m, args.calls, rng)
                key = (f"{n}x{k}", str(m))
                counts.add_row(*key, *[f"{row[c] / 1e6:.3f} ({m * n * k / row[c]:.2f})" for c in CANDIDATES])
                ratios.add_row(*key, *[f"{row[a] / row[b]:.2f}" for a, b in RATIOS.values()])
    finally:
        shutil.rmtree(board.host)
    console = Console(width=240)
    console.print(counts)
    console.print(ratios)


if __name__ == "__main__":
    main()
