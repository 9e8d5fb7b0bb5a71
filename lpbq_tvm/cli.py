"""The ``lpbq-tvm`` command line: argument parsing and readable output over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

import lpbq_tvm
from lpbq_tvm.compiler import atomic_write
from lpbq_tvm.encoder import ENCODERS, LPBQConfig
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export_encodings, export_onnx
from lpbq_tvm.passes.lower_lpbq import MODES
from lpbq_tvm.quantsim import LayerReport, QuantizationSimModel, set_grouped_blockwise_quantization_for_weights
from lpbq_tvm.targets import TARGETS

_DEMO_EPILOG = """\
example:
  lpbq-tvm demo                      # quantize, compile and run the built-in Conv/Gemm/MatMul model
  lpbq-tvm demo --block-size 32 --decompressed-bw 6
"""


def _layer_table(rows: list[LayerReport], title: str) -> Table:
    from lpbq_tvm.report import LAYER_HEADERS, layer_cells

    table = Table(title=title)
    for column in LAYER_HEADERS:
        table.add_column(column, justify="right" if column in ("SQNR dB", "bits/weight") else "left", overflow="fold")
    for row in rows:
        cells = [escape(cell) for cell in layer_cells(row)]
        if row.status == "skipped":
            cells[3] = f"[yellow]{cells[3]}[/]"
        table.add_row(*cells)
    return table


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run_demo(args: argparse.Namespace, console: Console) -> int:
    config = LPBQConfig(args.bitwidth, args.decompressed_bw, args.block_size, encoder=args.encoder)
    with console.status("importing the example model into Relax"):
        sim = QuantizationSimModel(build_example_model())
    calibration = [sim.random_inputs(seed) for seed in range(4)]
    with console.status("encoding weights and calibrating on 4 random batches (AnnotateLPBQ, EncodeLPBQ)"):
        set_grouped_blockwise_quantization_for_weights(
            sim,
            bitwidth=config.bitwidth,
            decompressed_bw=config.decompressed_bw,
            block_size=config.block_size,
            encoder=config.encoder,
        )
        sim.compute_encodings(lambda s, batches: [s.run(batch) for batch in batches], calibration)
    console.print(
        _layer_table(
            sim.report(), f"LPBQ W{config.bitwidth} (k 1..{config.max_int_scale}), block size {config.block_size}"
        )
    )
    with console.status("compiling with TVM for the host CPU (LowerLPBQ, tvm.compile)"):
        compiled = lpbq_tvm.compile(sim, target="cpu", mode="weight-only")
        reference = lpbq_tvm.compile(sim, target="cpu", mode="fp32")
    inputs = sim.random_inputs(seed=4)
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


_COMPILE_EPILOG = """\
examples:
  lpbq-tvm compile model.onnx -o build/                          # host CPU, weight-only, block size 64
  lpbq-tvm compile model.onnx --target aarch64 --mode w4a8 --calib calib.npz -o bundle/
  lpbq-tvm compile model.onnx --target htp-sim --mode w4a16 --calib calib.npz \\
      --input-shape x=1,3,224,224 --exclude Conv.2 -o htp/ --force

--calib takes an .npz with one array per model input, named like the input; its first axis
indexes calibration batches (an array of exactly the input's shape is one batch).
The output directory holds the library, params.bin and manifest.json.
"""


_EXPORT_EPILOG = """\
examples:
  lpbq-tvm export model.onnx --format aimet-json -o model.encodings            # AIMET 1.0.0
  lpbq-tvm export model.onnx --format ort-onnx -o model.int4.onnx              # onnxruntime CPU (MatMulNBits)
  lpbq-tvm export model.onnx --format ort-nbits-onnx -o model.nbits.onnx       # MatMulNBits nodes written directly
  lpbq-tvm export model.onnx --format qnn-onnx --calib calib.npz --activation-bits 16 -o model.qnn.onnx
  lpbq-tvm export model.onnx --format qnn-onnx --calib calib.npz --quantize-activations lpbq -o lpbq.qnn.onnx
  lpbq-tvm export model.onnx --format tvm --target aarch64 -o bundle/

qnn-onnx quantizes every activation (Q -> DQ with its calibrated encoding, as AIMET exports);
--quantize-activations lpbq only the LPBQ layers' inputs and outputs (the ops between them then
run in float, fp16 on the HTP).

Every file is checked after it is built and before it is written: ONNX by the onnx checker and
an onnxruntime run compared with the simulation (qnn-onnx: output codes vs the htp-sim target),
AIMET JSON by reading it back.
"""


def _input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            msg = f"--input-shape {spec!r} is not NAME=D1,D2,... (e.g. x=1,3,224,224)"
            raise ValueError(msg) from None
        if not name or any(d <= 0 for d in shapes[name]):
            msg = f"--input-shape {spec!r} is not NAME=D1,D2,... with positive sizes"
            raise ValueError(msg)
    return shapes


def _calibration_batches(path: str, sim: QuantizationSimModel) -> list[dict[str, np.ndarray]]:
    """Calibration batches from an .npz holding one array per model input (see --help)."""
    with np.load(path) as archive:
        arrays = dict(archive)
    names = [info.name for info in sim.inputs]
    if sorted(arrays) != sorted(names):
        msg = f"{path}: holds arrays {', '.join(sorted(arrays)) or '(none)'}; the model's inputs are {', '.join(names)}"
        raise ValueError(msg)
    batches = []
    for info in sim.inputs:
        array = arrays[info.name]
        if array.shape == info.shape:
            array = array[None]
        if array.shape[1:] != info.shape:
            msg = (
                f"{path}: '{info.name}' has shape {list(array.shape)}; expected [N, {', '.join(map(str, info.shape))}]"
            )
            raise ValueError(msg)
        batches.append(array.astype(info.dtype, copy=False))
    return [dict(zip(names, values, strict=True)) for values in zip(*batches, strict=True)]


def _quantized_sim(
    args: argparse.Namespace, console: Console, needs_calibration: str
) -> tuple[QuantizationSimModel, list[dict[str, np.ndarray]] | None]:
    """Import, select layers, encode and (with --calib) calibrate, as compile and export both do.

    ``needs_calibration`` says why calibration data is required (empty: it is not)."""
    config = LPBQConfig(args.bitwidth, args.decompressed_bw, args.block_size, encoder=args.encoder)
    with console.status(f"importing {args.model}"):
        sim = QuantizationSimModel(args.model, _input_shapes(args.input_shape))
    for change in sim.preparation:
        console.print(f"[dim]prepared: {escape(change)}[/]")
    set_grouped_blockwise_quantization_for_weights(
        sim,
        op_types=args.op_types,
        bitwidth=config.bitwidth,
        decompressed_bw=config.decompressed_bw,
        block_size=config.block_size,
        strict=args.strict,
        excluded_nodes=args.exclude,
        encoder=config.encoder,
    )
    budget = getattr(args, "target_cosine", None) is not None or getattr(args, "ratio", None) is not None
    if budget:
        held_out = _calibration_batches(args.held_out, sim) if args.held_out else None
        sim.set_precision_budget(args.target_cosine, args.ratio, held_out)
    elif getattr(args, "held_out", None):
        raise ValueError("--held-out measures a precision budget: give --target-cosine or --ratio too")
    if config.encoder == "mse-act" and not needs_calibration:
        needs_calibration = "--encoder mse-act weighs errors by calibration data"
    if budget and not needs_calibration:
        needs_calibration = "--target-cosine / --ratio measure the model on calibration data"
    if needs_calibration and not args.calib:
        raise ValueError(f"{args.command} {needs_calibration}: give calibration data with --calib FILE.npz")
    batches = _calibration_batches(args.calib, sim) if args.calib else None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("encoding and calibrating", total=len(batches) if batches else None)

        def calibrate(sim_: QuantizationSimModel, data: list[dict[str, np.ndarray]]) -> None:
            for batch in data:
                sim_.run(batch)
                progress.advance(task)

        if budget:
            progress.update(task, description="encoding, calibrating and choosing int8 layers")
        sim.compute_encodings(calibrate if batches else None, batches)
    if sim.precision_choice is not None:
        _print_precision(args, console, sim.precision_choice)
    console.print(
        _layer_table(sim.report(), f"{Path(args.model).name}: LPBQ W{config.bitwidth} block {config.block_size}")
    )
    return sim, batches


def _print_precision(args: argparse.Namespace, console: Console, choice) -> None:
    table = Table(title=f"precision: {choice.rule}")
    for column in ("choice", "cosine to fp32", "weights at 4 bits", "bits/weight"):
        table.add_column(column, justify="left" if column == "choice" else "right")
    for label, (cosine, share, bits) in (
        ("all LPBQ", choice.all_lpbq),
        (f"int8: {', '.join(choice.int8_nodes) or 'none'}", (choice.cosine, choice.share_4bit, choice.bits_per_weight)),
        ("all int8", choice.all_int8),
    ):
        table.add_row(escape(label), f"{cosine:.5f}", f"{share:.1%}", f"{bits:.3f}")
    console.print(table)
    if choice.held_out_cosine is not None:
        console.print(f"held-out data: cosine {choice.held_out_cosine:.5f} with the chosen int8 layers")
    args.result["precision"] = {
        "int8_nodes": list(choice.int8_nodes),
        "cosine": choice.cosine,
        "held_out_cosine": choice.held_out_cosine,
        "share_4bit": choice.share_4bit,
        "bits_per_weight": choice.bits_per_weight,
    }


def _refuse_existing(path: str, force: bool) -> Path:
    """Fail before any work when the output cannot be written (exists without --force, or a symlink)."""
    output = Path(path)
    if output.is_symlink():
        raise FileExistsError(f"{output} is a symbolic link; refusing to write through it")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to replace it")
    return output


def _write_bundle(
    sim: QuantizationSimModel,
    output: Path,
    target: str,
    mode: str,
    force: bool,
    console: Console,
    tuning_db: str | None = None,
) -> dict:
    tuned = f", schedules from {tuning_db}" if tuning_db else ""
    with console.status(f"compiling for {target} ({mode}{tuned})"):
        compiled = lpbq_tvm.compile(sim, target=target, mode=mode, tuning_db=tuning_db)
        bundle = compiled.export_bundle(output, overwrite=force)
    weights = compiled.weight_bytes
    summary = dict(
        output=str(bundle),
        files=sorted(p.name for p in bundle.iterdir()),
        target=target,
        mode=mode,
        weight_bytes={"lpbq_packed": weights.lpbq_packed, "float": weights.float},
    )
    console.print(
        f"wrote {bundle}/ ({', '.join(sorted(p.name for p in bundle.iterdir()))}): target {target}, "
        f"mode {mode}, weights {weights.total / 1024:.1f} KiB ({weights.lpbq_packed / 1024:.1f} KiB LPBQ packed)"
    )
    return summary


def _run_compile(args: argparse.Namespace, console: Console) -> int:
    output = _refuse_existing(args.output, args.force)
    needs = f"--mode {args.mode} quantizes activations" if args.mode in ("w4a8", "w4a16") else ""
    sim, _ = _quantized_sim(args, console, needs)
    args.result.update(_write_bundle(sim, output, args.target, args.mode, args.force, console, args.tuning_db))
    return 0


def _run_tune(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.tuning import tune

    output = _refuse_existing(args.output, args.force)
    if args.rpc and not args.key:
        raise ValueError("--rpc needs --key: the tracker key of the devices to measure on")
    needs = f"--mode {args.mode} quantizes activations" if args.mode in ("w4a8", "w4a16") else ""
    sim, _ = _quantized_sim(args, console, needs)
    where = f"{args.key!r} devices of {args.rpc}" if args.rpc else "this machine"
    with console.status(f"tuning {args.trials} trials on {where} (MetaSchedule)"):
        result = tune(
            sim,
            output,
            target=args.target,
            mode=args.mode,
            trials=args.trials,
            rpc=(args.rpc, args.key) if args.rpc else None,
            timeout=args.timeout,
        )
    args.result.update(
        output=str(result.work_dir), tasks=list(result.tasks), skipped=list(result.skipped), records=result.records
    )
    console.print(
        f"wrote {result.work_dir}/: {result.records} records for {', '.join(result.tasks)}"
        f" (hand-scheduled, not tuned: {', '.join(result.skipped) or 'none'}); "
        f"use it with: lpbq-tvm compile ... --tuning-db {result.work_dir}"
    )
    return 0


def _run_export(args: argparse.Namespace, console: Console) -> int:
    output = _refuse_existing(args.output, args.force)
    needs = {"qnn-onnx": "--format qnn-onnx quantizes activations"}.get(args.format, "")
    sim, batches = _quantized_sim(args, console, needs)
    if args.format == "tvm":
        args.result.update(_write_bundle(sim, output, args.target, args.mode, args.force, console))
        return 0
    with console.status(f"exporting {args.format} and validating it"):
        if args.format == "aimet-json":
            report = export_encodings(sim, output, args.encoding_version, overwrite=args.force)
        else:
            report = export_onnx(
                sim,
                output,
                args.format.removesuffix("-onnx"),
                overwrite=args.force,
                activation_bitwidth=args.activation_bits,
                quantize_all_activations=args.quantize_activations == "all",
                sample_inputs=batches[0] if batches else None,
            )
    args.result.update(output=str(report.path), format=report.format, bytes=report.bytes, checks=report.checks)
    checks = "; ".join(f"{name}: {result}" for name, result in report.checks.items())
    console.print(f"wrote {report.path} ({report.bytes / 1024:.1f} KiB, {report.format}); checks: {checks}")
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
    parser.add_argument(
        "--encoder",
        default=defaults.encoder,
        choices=list(ENCODERS),
        help="how scales are chosen: aimet (bit-exact with AIMET), mse (least weight error), "
        "mse-act (error weighted by calibration data; needs --calib) (default %(default)s)",
    )


def _command(commands, name: str, handler, help: str, epilog: str) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand with its handler, its one-line help and worked examples after the options."""
    parser = commands.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpbq-tvm",
        description="Low-Power Blockwise Quantization of ONNX models, compiled with Apache TVM.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON result instead of tables")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = _command(
        commands,
        "demo",
        _run_demo,
        "quantize, compile and run the built-in example model; print per-layer and output quality",
        _DEMO_EPILOG,
    )
    _add_lpbq_options(demo)

    compile_ = _command(
        commands,
        "compile",
        _run_compile,
        "quantize an ONNX model with LPBQ and build a deployment bundle for a target",
        _COMPILE_EPILOG,
    )
    compile_.add_argument("-o", "--output", required=True, help="bundle directory to write")
    compile_.add_argument("--tuning-db", metavar="DIR", help="apply the schedules `lpbq-tvm tune` wrote to DIR")
    _add_model_options(compile_)
    _add_target_options(compile_)

    tune_ = _command(
        commands,
        "tune",
        _run_tune,
        "tune the model's kernels with MetaSchedule (optional) into a database compile --tuning-db reuses",
        "examples:\n  lpbq-tvm tune model.onnx --trials 200 -o tuning/\n"
        "  lpbq-tvm tune model.onnx --target aarch64 --trials 500 --rpc 10.0.0.2:9190 --key board -o tuning/\n"
        "  lpbq-tvm compile model.onnx --tuning-db tuning/ -o bundle/\n",
    )
    tune_.add_argument("-o", "--output", required=True, help="database directory to write")
    tune_.add_argument("--trials", type=int, default=64, help="measurements in all (default %(default)s)")
    tune_.add_argument("--rpc", metavar="HOST:PORT", help="measure on the devices of this TVM RPC tracker")
    tune_.add_argument("--key", help="the tracker key of the devices to measure on (with --rpc)")
    tune_.add_argument("--timeout", type=float, default=60.0, help="seconds per remote measurement session")
    _add_model_options(tune_)
    _add_target_options(tune_)

    export = _command(
        commands,
        "export",
        _run_export,
        "write AIMET encodings, QNN / onnxruntime ONNX or a TVM bundle, each validated",
        _EXPORT_EPILOG,
    )
    export.add_argument(
        "--format", required=True, choices=["aimet-json", "qnn-onnx", "ort-onnx", "ort-nbits-onnx", "tvm"]
    )
    export.add_argument("-o", "--output", required=True, help="file (directory for --format tvm) to write")
    export.add_argument(
        "--encoding-version",
        default="1.0.0",
        choices=["1.0.0", "2.0.0"],
        help="AIMET encodings version (default %(default)s; 2.0.0 switches QNN's converter to its newer quantizer)",
    )
    export.add_argument(
        "--activation-bits", type=int, default=8, choices=[8, 16], help="QNN export activation width (default 8)"
    )
    export.add_argument(
        "--quantize-activations",
        default="all",
        choices=["all", "lpbq"],
        help="QNN export: Q/DQ on every activation, or only on the LPBQ layers' inputs and outputs (default all)",
    )
    _add_model_options(export)
    _add_target_options(export)

    analyze = _command(
        commands,
        "analyze",
        _run_analyze,
        "per-layer sensitivity to LPBQ on calibration data, worst layer first (with a budget: the int8 choice)",
        "examples:\n  lpbq-tvm analyze model.onnx --calib calib.npz\n"
        "  lpbq-tvm analyze model.onnx --calib calib.npz --target-cosine 0.99\n",
    )
    _add_model_options(analyze)

    report = _command(
        commands,
        "report",
        _run_report,
        "quantize a model and write an HTML + Markdown report: layers, sizes, output agreement, plots",
        "example:\n  lpbq-tvm report model.onnx --calib calib.npz -o report/\n",
    )
    report.add_argument("-o", "--output", required=True, help="report directory to write")
    _add_model_options(report)

    run = _command(
        commands,
        "run",
        _run_run,
        "run a bundle written by compile / export --format tvm on inputs from an .npz",
        "examples:\n  lpbq-tvm run bundle/ --inputs inputs.npz -o outputs.npz\n"
        "  lpbq-tvm run bundle/ --inputs inputs.npz --rpc 127.0.0.1:9190 --key board   # a device of an RPC tracker\n",
    )
    run.add_argument("bundle", help="the bundle directory")
    run.add_argument("--inputs", required=True, help=".npz with one array per model input")
    run.add_argument("-o", "--output", help=".npz to write the outputs to")
    run.add_argument("--force", action="store_true", help="replace an existing output")
    run.add_argument("--rpc", metavar="HOST:PORT", help="run on a device of this TVM RPC tracker instead of here")
    run.add_argument("--key", help="the tracker key of the devices to run on (with --rpc)")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a free device (default 60)")

    bench = _command(
        commands,
        "bench",
        _run_bench,
        "time onnxruntime fp32, TVM fp32 and TVM LPBQ (each mode) on one model, side by side",
        "examples:\n  lpbq-tvm bench model.onnx --calib calib.npz --threads 2 --repeat 50\n"
        "  lpbq-tvm bench model.onnx --target aarch64 --rpc 127.0.0.1:9190 --key board   # on a device\n",
    )
    bench.add_argument("--threads", type=int, default=1, help="TVM and onnxruntime threads (default 1)")
    bench.add_argument("--repeat", type=int, default=20, help="timed runs per runtime (default 20)")
    bench.add_argument("--rpc", metavar="HOST:PORT", help="time the TVM builds on a device of this RPC tracker")
    bench.add_argument("--key", help="the tracker key of the devices to time on (with --rpc)")
    bench.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a free device (default 60)")
    bench.add_argument(
        "--target",
        default="cpu",
        choices=["cpu", "aarch64"],
        help="what to build for (with --rpc: the device's architecture; default %(default)s)",
    )
    _add_model_options(bench)

    check = _command(
        commands,
        "check",
        _run_check,
        "pre-flight check of a QDQ ONNX model for Qualcomm's QNN toolchain (exit 1 when problems are found)",
        "example:\n  lpbq-tvm check model.qnn.onnx --for qnn\n",
    )
    check.add_argument("model", help="the ONNX model file")
    check.add_argument("--for", dest="target_toolchain", default="qnn", choices=["qnn"], help="toolchain to check for")
    return parser


def _sample_batches(sim: QuantizationSimModel, batches, count: int = 2) -> list[dict[str, np.ndarray]]:
    """Calibration batches if given, else ``count`` seeded random batches."""
    return list(batches) if batches else [sim.random_inputs(seed) for seed in range(count)]


def _run_report(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.report import build_report, write_report

    output = _refuse_existing(args.output, args.force)
    sim, batches = _quantized_sim(args, console, "")
    modes = ["weight-only"] + (["w4a8", "w4a16"] if batches else [])
    rows = []
    if batches and any(row.status == "lpbq" for row in sim.report()):
        from lpbq_tvm.analysis import sensitivity

        with console.status("quantizing one layer at a time (sensitivity)"):
            rows = sensitivity(sim, batches)
    with console.status("compiling fp32 and LPBQ, running sample inputs"):
        report = build_report(sim, _sample_batches(sim, batches), modes, name=Path(args.model).name, sensitivity=rows)
        directory = write_report(report, output, overwrite=args.force)
    args.result.update(
        output=str(directory),
        agreements=[vars(a) for a in report.agreements],
        fp32_bytes=report.fp32_bytes,
        lpbq_bytes=report.lpbq_bytes,
    )
    console.print(f"wrote {directory}/index.html and report.md ({', '.join(a.mode for a in report.agreements)})")
    return 0


def _run_analyze(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.analysis import sensitivity

    if not args.calib:
        raise ValueError("analyze measures the model on calibration data: give it with --calib FILE.npz")
    budget = args.target_cosine, args.ratio, args.held_out
    args.target_cosine = args.ratio = args.held_out = None  # measure all-LPBQ first, then choose
    sim, batches = _quantized_sim(args, console, "")
    with console.status("quantizing one layer at a time"):
        rows = sensitivity(sim, batches)
    table = Table(title=f"{Path(args.model).name}: each layer alone at LPBQ, worst first")
    for column in ("layer", "op", "weights", "model cosine", "layer SQNR dB"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right", overflow="fold")
    for row in rows:
        table.add_row(
            escape(row.node), row.op_type, f"{row.weights:,}", f"{row.cosine:.5f}", f"{row.layer_sqnr_db:.2f}"
        )
    console.print(table)
    args.result["sensitivity"] = [vars(row) for row in rows]
    args.target_cosine, args.ratio, args.held_out = budget
    if args.target_cosine is not None or args.ratio is not None:
        held_out = _calibration_batches(args.held_out, sim) if args.held_out else None
        sim.set_precision_budget(args.target_cosine, args.ratio, held_out)
        with console.status("choosing int8 layers"):
            sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
        _print_precision(args, console, sim.precision_choice)
    return 0


def _run_run(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.bundle import load_bundle, read_manifest

    output = _refuse_existing(args.output, args.force) if args.output else None
    with np.load(args.inputs) as archive:
        inputs = dict(archive)
    if args.rpc:
        from lpbq_tvm.remote import run_remote

        if not args.key:
            raise ValueError("--rpc needs --key: the tracker key of the devices to run on")
        with console.status(f"running on a {args.key!r} device of the tracker at {args.rpc}"):
            remote = run_remote(args.bundle, args.rpc, args.key, inputs, timeout=args.timeout)
        outputs = remote.outputs
        args.result["timing_ms"] = vars(remote.timing)
        console.print(
            f"{remote.device}: main {remote.timing.median_ms:.3f} ms median "
            f"({remote.timing.min_ms:.3f}..{remote.timing.max_ms:.3f})"
        )
    else:
        outputs = load_bundle(args.bundle).run(inputs)
    args.result["outputs"] = {name: {"shape": list(v.shape), "dtype": str(v.dtype)} for name, v in outputs.items()}
    manifest = read_manifest(args.bundle)
    table = Table(title=f"{args.bundle}: target {manifest['target']}, mode {manifest['mode']}")
    for column in ("output", "shape", "dtype", "min", "max", "mean"):
        table.add_column(column)
    for name, value in outputs.items():
        table.add_row(
            name,
            str(list(value.shape)),
            str(value.dtype),
            f"{value.min():.4g}",
            f"{value.max():.4g}",
            f"{value.mean():.4g}",
        )
    console.print(table)
    if output is not None:
        atomic_write(output, lambda tmp: np.savez(tmp, **outputs))  # tmp keeps the .npz suffix
        console.print(f"wrote {output}")
    return 0


def _run_bench(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.bench import benchmark_model, benchmark_remote, set_threads

    if args.rpc and not args.key:
        raise ValueError("--rpc needs --key: the tracker key of the devices to time on")
    if args.target != "cpu" and not args.rpc:
        raise ValueError(f"a {args.target} build runs on its device: give the tracker with --rpc and --key")
    set_threads(args.threads)
    sim, batches = _quantized_sim(args, console, "")
    inputs = _sample_batches(sim, batches, count=1)[0]
    modes = ["weight-only"] + (["w4a8", "w4a16"] if batches else [])
    where = f"a {args.key!r} device of {args.rpc}" if args.rpc else "here"
    with console.status(f"compiling and timing fp32, {', '.join(modes)} on {where} ({args.repeat} runs each)"):
        if args.rpc:
            result = benchmark_remote(
                sim, inputs, modes, args.rpc, args.key, target=args.target, repeat=args.repeat, timeout=args.timeout
            )
        else:
            result = benchmark_model(sim, inputs, modes, args.repeat, args.threads)
    threads = f"{args.threads} thread(s)" if result.threads else "the device's threads"
    table = Table(title=f"{Path(args.model).name} on {where}: median of {args.repeat} runs, {threads}")
    ratios = ("vs TVM fp32", "vs onnxruntime fp32")
    for column in ("runtime", "median ms", "min ms", "max ms", *ratios, "compile s", "weight KiB"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    base = result.tvm["fp32"].median_ms
    ort = result.onnxruntime_fp32.median_ms if result.onnxruntime_fp32 else None
    args.result.update(
        device=where,
        threads=result.threads,
        onnxruntime_fp32=vars(result.onnxruntime_fp32) if result.onnxruntime_fp32 else None,
        tvm={mode: vars(t) for mode, t in result.tvm.items()},
        tvm_vs_onnxruntime_fp32={mode: t.median_ms / ort for mode, t in result.tvm.items()} if ort else None,
        compile_seconds=result.compile_seconds,
        weight_bytes=result.weight_bytes,
    )
    rows = [("onnxruntime fp32", result.onnxruntime_fp32, "", "")] if result.onnxruntime_fp32 else []
    rows += [
        (f"TVM {mode}", timing, f"{result.compile_seconds[mode]:.2f}", f"{result.weight_bytes[mode] / 1024:.1f}")
        for mode, timing in result.tvm.items()
    ]
    for label, timing, seconds, kib in rows:
        table.add_row(
            label,
            f"{timing.median_ms:.3f}",
            f"{timing.min_ms:.3f}",
            f"{timing.max_ms:.3f}",
            f"{timing.median_ms / base:.2f}x",
            f"{timing.median_ms / ort:.2f}x" if ort else "",
            seconds,
            kib,
        )
    console.print(table)
    if args.rpc:
        console.print("[dim]onnxruntime is not measured on a remote device[/]")
    return 0


def _run_check(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.exports.qnn_check import check_qnn
    from lpbq_tvm.frontend import load_onnx

    findings = check_qnn(load_onnx(args.model))
    args.result["findings"] = [vars(finding) for finding in findings]
    if not findings:
        console.print(f"{args.model}: no problems found for {args.target_toolchain}")
        return 0
    table = Table(title=f"{args.model}: {len(findings)} problem(s) for {args.target_toolchain}")
    for column in ("node", "problem", "fix"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        table.add_row(escape(finding.node), escape(finding.problem), escape(finding.fix))
    console.print(table)
    return EXIT_PROBLEMS_FOUND


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", choices=sorted(TARGETS), help="where it runs (default %(default)s)")
    parser.add_argument(
        "--mode", default="weight-only", choices=list(MODES), help="kernel arithmetic (default %(default)s)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("--calib", help="calibration data (.npz), needed by w4a8 / w4a16 / qnn-onnx")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="pin an input's shape (repeatable); a dynamic batch dimension defaults to 1",
    )
    parser.add_argument(
        "--op-types",
        nargs="+",
        default=["Gemm", "MatMul", "Conv"],
        metavar="OP",
        help="op types to quantize (default: Gemm MatMul Conv)",
    )
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="ONNX node names to keep in fp32")
    parser.add_argument("--strict", action="store_true", help="fail on a layer that cannot take the block size")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    _add_lpbq_options(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-cosine",
        type=float,
        metavar="C",
        help="keep the most sensitive layers at int8 per channel until the model output cosine to fp32 "
        "reaches C on the calibration data (needs --calib)",
    )
    budget.add_argument(
        "--ratio",
        type=float,
        metavar="R",
        help="keep the most sensitive layers at int8 while a share R of the weights stays at 4 bits (needs --calib)",
    )
    parser.add_argument(
        "--held-out", metavar="FILE.npz", help="batches (like --calib) to report the budget's cosine on as well"
    )


# Exit codes, distinct per kind of failure.
EXIT_PROBLEMS_FOUND = 1  # `check` found problems
EXIT_BAD_INPUT = 2  # invalid model, options or data
EXIT_OUTPUT_EXISTS = 3  # the output exists (without --force) or is a symbolic link
EXIT_IO = 4  # a file could not be read or written
EXIT_TOOLCHAIN = 5  # TVM or onnxruntime failed on a valid model
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        logging.DEBUG
        if args.debug
        else logging.INFO
        if args.verbose
        else logging.ERROR
        if args.quiet
        else logging.WARNING
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console(quiet=args.quiet or args.json)
    args.result = {}
    failures = (
        (FileExistsError, EXIT_OUTPUT_EXISTS),
        (ValueError, EXIT_BAD_INPUT),
        (OSError, EXIT_IO),
        (RuntimeError, EXIT_TOOLCHAIN),
    )
    try:
        code = args.handler(args, console)
        if args.json:
            print(json.dumps({"exit_code": code, **args.result}, default=str))
        return code
    except KeyboardInterrupt:
        print(f"lpbq-tvm {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except tuple(kind for kind, _ in failures) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"lpbq-tvm {args.command}: error: {message}", file=sys.stderr)
        code = next(code for kind, code in failures if isinstance(error, kind))
        if args.json:
            print(json.dumps({"exit_code": code, "error": message}))
        return code
