"""The ``lpbq-tvm`` command line: argument parsing and readable output over the public API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from lpbq_tvm.encoder import LPBQConfig, encode_lpbq, sqnr_db
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.onnx_layers import find_weight_layers
from lpbq_tvm.packing import bits_per_weight

_DEMO_EPILOG = """\
example:
  lpbq-tvm demo                      # encode the built-in Conv/Gemm/MatMul model, block size 64
  lpbq-tvm demo --block-size 32 --decompressed-bw 6
"""


def _k_summary(k: np.ndarray, max_k: int) -> str:
    """``k`` distribution in one cell: min, median and the share of blocks at the top value."""
    top_share = 100.0 * np.mean(k == max_k)
    return f"{k.min()}..{k.max()}  median {np.median(k):g}  k={max_k}: {top_share:.0f}%"


def _run_demo(args: argparse.Namespace, console: Console) -> int:
    config = LPBQConfig(args.bitwidth, args.decompressed_bw, args.block_size)
    model = build_example_model()
    table = Table(title=f"LPBQ W{config.bitwidth} (k 1..{config.max_int_scale}), block size {config.block_size}")
    for column in ("layer", "op", "weight shape", "SQNR dB", "bits/weight", "k"):
        table.add_column(column, justify="right" if column in ("SQNR dB", "bits/weight") else "left")
    for layer in find_weight_layers(model):
        encoding = encode_lpbq(
            layer.weight, layer.channel_axis, layer.block_axis, **config.as_dict(), name=layer.node_name
        )
        table.add_row(
            layer.node_name,
            layer.op_type,
            "x".join(map(str, layer.weight.shape)),
            f"{sqnr_db(layer.weight, encoding.qdq_weight):.2f}",
            f"{bits_per_weight(encoding):.3f}",
            _k_summary(encoding.per_block_int_scale, config.max_int_scale),
        )
    console.print(table)
    return 0


def _add_lpbq_options(parser: argparse.ArgumentParser) -> None:
    defaults = LPBQConfig()
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="input channels per block (default %(default)s)")
    parser.add_argument("--bitwidth", type=int, default=defaults.bitwidth, help="bits of the block codes q (default %(default)s)")
    parser.add_argument(
        "--decompressed-bw", type=int, default=defaults.decompressed_bw,
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
        "demo", help="quantize the built-in example model and print a per-layer table",
        epilog=_DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_lpbq_options(demo)
    demo.set_defaults(handler=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        return args.handler(args, console)
    except (ValueError, OSError) as error:
        print(f"lpbq-tvm {args.command}: error: {error}", file=sys.stderr)
        return 2
