"""The handlers of the ``lpbq-tvm`` commands: each reads its parsed arguments, calls the public API and
prints tables; ``args.result`` collects what ``--json`` prints."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from lpbq_tvm.cli.inputs import calibration_batches, input_shapes, sample_batches
from lpbq_tvm.compiler import compile as compile_model
from lpbq_tvm.encoder import LPBQConfig
from lpbq_tvm.examples import build_example_model
from lpbq_tvm.export import export, get_exporter
from lpbq_tvm.io import atomic_write, check_writable
from lpbq_tvm.modes import LPBQ_MODES, is_dynamic, needs_calibration
from lpbq_tvm.quantsim import LayerReport, QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

EXIT_PROBLEMS_FOUND = 1  # `check` found problems


def _refuse_existing(path: str, force: bool) -> Path:
    """Fail before any work when the output cannot be written (exists without --force, or a symlink)."""
    return check_writable(path, force, hint="pass --force")


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


def run_demo(args: argparse.Namespace, console: Console) -> int:
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
        compiled = compile_model(sim, target="cpu", mode="weight-only")
        reference = compile_model(sim, target="cpu", mode="fp32")
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


def _quantized_sim(
    args: argparse.Namespace, console: Console, calibration_reason: str
) -> tuple[QuantizationSimModel, list[dict[str, np.ndarray]] | None]:
    """Import, select layers, encode and (with --calib) calibrate, as compile and export both do.

    ``calibration_reason`` says why calibration data is required (empty: it is not)."""
    config = LPBQConfig(args.bitwidth, args.decompressed_bw, args.block_size, encoder=args.encoder)
    with console.status(f"importing {args.model}"):
        sim = QuantizationSimModel(args.model, input_shapes(args.input_shape))
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
        held_out = calibration_batches(args.held_out, sim) if args.held_out else None
        sim.set_precision_budget(args.target_cosine, args.ratio, held_out)
    elif getattr(args, "held_out", None):
        raise ValueError("--held-out measures a precision budget: give --target-cosine or --ratio too")
    if config.encoder == "mse-act" and not calibration_reason:
        calibration_reason = "--encoder mse-act weighs errors by calibration data"
    if budget and not calibration_reason:
        calibration_reason = "--target-cosine / --ratio measure the model on calibration data"
    if calibration_reason and not args.calib:
        raise ValueError(f"{args.command} {calibration_reason}: give calibration data with --calib FILE.npz")
    batches = calibration_batches(args.calib, sim) if args.calib else None
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


def run_compile(args: argparse.Namespace, console: Console) -> int:
    output = _refuse_existing(args.output, args.force)
    needs = f"--mode {args.mode} quantizes activations" if needs_calibration(args.mode) else ""
    sim, _ = _quantized_sim(args, console, needs)
    tuned = f", schedules from {args.tuning_db}" if args.tuning_db else ""
    with console.status(f"compiling for {args.target} ({args.mode}{tuned})"):
        compiled = compile_model(sim, target=args.target, mode=args.mode, tuning_db=args.tuning_db)
        bundle = compiled.export_bundle(output, overwrite=args.force)
    weights = compiled.weight_bytes
    files = sorted(p.name for p in bundle.iterdir())
    args.result.update(
        output=str(bundle),
        files=files,
        target=args.target,
        mode=args.mode,
        weight_bytes={"lpbq_packed": weights.lpbq_packed, "float": weights.float},
    )
    console.print(
        f"wrote {bundle}/ ({', '.join(files)}): target {args.target}, mode {args.mode}, "
        f"weights {weights.total / 1024:.1f} KiB ({weights.lpbq_packed / 1024:.1f} KiB LPBQ packed)"
    )
    return 0


def run_tune(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.tuning import tune

    output = _refuse_existing(args.output, args.force)
    if args.rpc and not args.key:
        raise ValueError("--rpc needs --key: the tracker key of the devices to measure on")
    needs = f"--mode {args.mode} quantizes activations" if needs_calibration(args.mode) else ""
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


def run_export(args: argparse.Namespace, console: Console) -> int:
    output = _refuse_existing(args.output, args.force)
    exporter = get_exporter(args.format)
    needs = f"--format {args.format} quantizes activations" if exporter.needs_calibration else ""
    sim, batches = _quantized_sim(args, console, needs)
    with console.status(f"exporting {args.format} and validating it"):
        report = export(
            sim,
            output,
            args.format,
            overwrite=args.force,
            sample_inputs=batches[0] if batches else None,
            activation_bitwidth=args.activation_bits,
            quantize_all_activations=args.quantize_activations == "all",
            encoding_version=args.encoding_version,
            target=args.target,
            mode=args.mode,
        )
    args.result.update(output=str(report.path), format=report.format, bytes=report.bytes, checks=report.checks)
    checks = "; ".join(f"{name}: {result}" for name, result in report.checks.items())
    console.print(f"wrote {report.path} ({report.bytes / 1024:.1f} KiB, {report.format}); checks: {checks}")
    return 0


def _comparable_modes(sim, batches) -> list[str]:
    """The LPBQ modes report and bench compare: the calibrated ones given calibration data, w4a8-dynamic
    where every LPBQ layer is dense (it has no convolution form)."""
    encoded = sim.encodings
    convs = any(layer.op_type == "Conv" for name, layer in sim.layers.items() if name in encoded)
    return [
        mode for mode in LPBQ_MODES if (batches or not needs_calibration(mode)) and not (convs and is_dynamic(mode))
    ]


def run_report(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.report import build_report, write_report

    output = _refuse_existing(args.output, args.force)
    sim, batches = _quantized_sim(args, console, "")
    modes = _comparable_modes(sim, batches)
    rows = []
    if batches and any(row.status == "lpbq" for row in sim.report()):
        from lpbq_tvm.analysis import sensitivity

        with console.status("quantizing one layer at a time (sensitivity)"):
            rows = sensitivity(sim, batches)
    with console.status("compiling fp32 and LPBQ, running sample inputs"):
        report = build_report(sim, sample_batches(sim, batches), modes, name=Path(args.model).name, sensitivity=rows)
        directory = write_report(report, output, overwrite=args.force)
    args.result.update(
        output=str(directory),
        agreements=[vars(a) for a in report.agreements],
        fp32_bytes=report.fp32_bytes,
        lpbq_bytes=report.lpbq_bytes,
    )
    console.print(f"wrote {directory}/index.html and report.md ({', '.join(a.mode for a in report.agreements)})")
    return 0


def run_analyze(args: argparse.Namespace, console: Console) -> int:
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
        held_out = calibration_batches(args.held_out, sim) if args.held_out else None
        sim.set_precision_budget(args.target_cosine, args.ratio, held_out)
        with console.status("choosing int8 layers"):
            sim.compute_encodings(lambda s, data: [s.run(batch) for batch in data], batches)
        _print_precision(args, console, sim.precision_choice)
    return 0


def run_run(args: argparse.Namespace, console: Console) -> int:
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


def run_bench(args: argparse.Namespace, console: Console) -> int:
    from lpbq_tvm.bench import benchmark_model, benchmark_remote, set_threads

    if args.rpc and not args.key:
        raise ValueError("--rpc needs --key: the tracker key of the devices to time on")
    if args.target != "cpu" and not args.rpc:
        raise ValueError(f"a {args.target} build runs on its device: give the tracker with --rpc and --key")
    set_threads(args.threads)
    sim, batches = _quantized_sim(args, console, "")
    inputs = sample_batches(sim, batches, count=1)[0]
    modes = _comparable_modes(sim, batches)
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


def run_check(args: argparse.Namespace, console: Console) -> int:
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
