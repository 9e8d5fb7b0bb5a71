"""The ``lpbq-tvm`` command line: argument parsing and readable output over the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lpbq_tvm
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.quantsim import LayerReport, QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

_DEMO_EPILOG = """\
example:
  lpbq-tvm demo                      # quantize, compile and run the built-in Conv/Gemm/MatMul model
  lpbq-tvm demo --block-size 32 --decompressed-bw 6
"""


def _k_summary(histogram: tuple[int, ...]) -> str:
    """The k distribution in one cell: range, median and the share of blocks at the top value."""
    counts = np.asarray(histogram)
    values = np.repeat(np.arange(1, len(counts) + 1), counts)
    top_share = 100.0 * counts[-1] / counts.sum()
    return f"{values.min()}-{values.max()} med {np.median(values):g} {top_share:.0f}%@{len(counts)}"


def _layer_table(rows: list[LayerReport], title: str) -> Table:
    table = Table(title=title)
    for column in ("layer", "op", "weight shape", "status", "SQNR dB", "bits/weight", "k"):
        table.add_column(column, justify="right" if column in ("SQNR dB", "bits/weight") else "left", overflow="fold")
    for row in rows:
        quantized = row.status == "lpbq"
        table.add_row(
            row.node,
            row.op_type,
            "x".join(map(str, row.shape)),
            f"LPBQ B{row.block_size}" if quantized else f"[yellow]fp32[/]: {escape(row.reason)}",
            f"{row.sqnr_db:.2f}" if quantized else "",
            f"{row.bits_per_weight:.3f}" if quantized else "32",
            _k_summary(row.k_histogram) if quantized else "",
        )
    return table


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run_demo(args: argparse.Namespace, console: Console) -> int:
    config = LPBQConfig(args.bitwidth, args.decompressed_bw, args.block_size)
    with console.status("importing the example model into Relax"):
        sim = QuantizationSimModel(build_example_model())
    with console.status("encoding weights (AnnotateLPBQ, EncodeLPBQ)"):
        set_grouped_blockwise_quantization_for_weights(
            sim, bitwidth=config.bitwidth, decompressed_bw=config.decompressed_bw, block_size=config.block_size
        )
        sim.compute_encodings()
    console.print(
        _layer_table(
            sim.report(), f"LPBQ W{config.bitwidth} (k 1..{config.max_int_scale}), block size {config.block_size}"
        )
    )
    with console.status("compiling with TVM for the host CPU (LowerLPBQ, tvm.compile)"):
        compiled = lpbq_tvm.compile(sim, target="cpu", mode="weight-only")
        reference = lpbq_tvm.compile(sim, target="cpu", mode="fp32")
    inputs = {"x": np.random.default_rng(0).standard_normal(sim.inputs[0].shape).astype(np.float32)}
    lpbq_out, fp32_out = compiled.run(inputs)["y"], reference.run(inputs)["y"]
    simulated = sim.run(inputs)["y"]
    packed, fp32 = compiled.weight_bytes, reference.weight_bytes
    summary = Table.grid(padding=(0, 2))
    summary.add_row(
        "output vs fp32",
        f"cosine {_cosine(lpbq_out, fp32_out):.5f}, "
        f"max |diff| {np.abs(lpbq_out - fp32_out).max():.3g} (|y| max {np.abs(fp32_out).max():.3g})",
    )
    summary.add_row(
        "kernels vs simulation",
        f"max |diff| {np.abs(lpbq_out - simulated).max():.2g} "
        "(TVM packed kernels vs onnxruntime with dequantized weights)",
    )
    summary.add_row(
        "weights in the artifact",
        f"{packed.total / 1024:.1f} KiB (LPBQ packed {packed.lpbq_packed / 1024:.1f} "
        f"KiB, fp32 {packed.float / 1024:.1f} KiB) vs {fp32.total / 1024:.1f} KiB "
        f"fp32: {fp32.total / packed.total:.1f}x smaller",
    )
    console.print(summary)
    return 0


def _add_lpbq_options(parser: argparse.ArgumentParser) -> None:
    defaults = LPBQConfig()
    parser.add_argument(
        "--block-size", type=int, default=defaults.block_size, help="input channels per block (default %(default)s)"
    )
    parser.add_argument(
        "--bitwidth", type=int, default=defaults.bitwidth, help="bits of the block codes q (default %(default)s)"
    )
    parser.add_argument(
        "--decompressed-bw",
        type=int,
        default=defaults.decompressed_bw,
        help="bits of the expanded per-channel integer weight q*k (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpbq-tvm",
        description="Low-Power Blockwise Quantization of ONNX models, compiled with Apache TVM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="quantize, compile and run the built-in example model; print per-layer and output quality",
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_lpbq_options(demo)
    demo.set_defaults(handler=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    console = Console()
    try:
        return args.handler(args, console)
    except (ValueError, OSError) as error:
        print(f"lpbq-tvm {args.command}: error: {error}", file=sys.stderr)
        return 2
