"""The ``lpbq-tvm`` argument parser: one subcommand per command, each with worked examples in its help.

Choices come from the registries: ``--target`` from :data:`lpbq_tvm.targets.TARGETS`, ``--mode``
from :mod:`lpbq_tvm.modes`, ``--format`` from :data:`lpbq_tvm.export.EXPORTERS`, ``--encoder``
from the encoder's list.
"""

from __future__ import annotations

import argparse
import re

from lpbq_tvm.cli import commands, llm_commands
from lpbq_tvm.encoder import ENCODERS, LPBQConfig
from lpbq_tvm.export import EXPORTERS
from lpbq_tvm.exports.aimet_json import VERSIONS
from lpbq_tvm.modes import LPBQ_MODES
from lpbq_tvm.targets import TARGETS

__all__ = ["build_parser"]

_DEMO_EPILOG = """\
example:
  lpbq-tvm demo                      # quantize, compile and run the built-in Conv/Gemm/MatMul model
  lpbq-tvm demo --block-size 32 --decompressed-bw 6
"""


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
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_demo, _compile, _tune, _export, _analyze, _report, _run, _bench, _check, _generate, _perplexity):
        add(subparsers)
    return parser


def _command(subparsers, name: str, handler, help: str, epilog: str) -> argparse.ArgumentParser:  # noqa: A002
    """A subcommand with its handler, its one-line help and worked examples after the options."""
    parser = subparsers.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _demo(subparsers) -> None:
    demo = _command(
        subparsers,
        "demo",
        commands.run_demo,
        "quantize, compile and run the built-in example model; print per-layer and output quality",
        _DEMO_EPILOG,
    )
    _add_lpbq_options(demo)


def _compile(subparsers) -> None:
    compile_ = _command(
        subparsers,
        "compile",
        commands.run_compile,
        "quantize an ONNX model with LPBQ and build a deployment bundle for a target",
        _COMPILE_EPILOG,
    )
    compile_.add_argument("-o", "--output", required=True, help="bundle directory to write")
    compile_.add_argument("--tuning-db", metavar="DIR", help="apply the schedules `lpbq-tvm tune` wrote to DIR")
    _add_model_options(compile_)
    _add_target_options(compile_)


def _tune(subparsers) -> None:
    tune = _command(
        subparsers,
        "tune",
        commands.run_tune,
        "tune the model's kernels with MetaSchedule (optional) into a database compile --tuning-db reuses",
        "examples:\n  lpbq-tvm tune model.onnx --trials 200 -o tuning/\n"
        "  lpbq-tvm tune model.onnx --target aarch64 --trials 500 --rpc 10.0.0.2:9190 --key board -o tuning/\n"
        "  lpbq-tvm compile model.onnx --tuning-db tuning/ -o bundle/\n",
    )
    tune.add_argument("-o", "--output", required=True, help="database directory to write")
    tune.add_argument("--trials", type=int, default=64, help="measurements in all (default %(default)s)")
    tune.add_argument("--rpc", metavar="HOST:PORT", help="measure on the devices of this TVM RPC tracker")
    tune.add_argument("--key", help="the tracker key of the devices to measure on (with --rpc)")
    tune.add_argument("--timeout", type=float, default=60.0, help="seconds per remote measurement session")
    _add_model_options(tune)
    _add_target_options(tune)


def _export(subparsers) -> None:
    formats = "\n".join(f"  {name:<16} {exporter.summary}" for name, exporter in EXPORTERS.items())
    export = _command(
        subparsers,
        "export",
        commands.run_export,
        "write AIMET encodings, QNN / onnxruntime ONNX or a TVM bundle, each validated",
        f"formats:\n{formats}\n\n{_EXPORT_EPILOG}",
    )
    export.add_argument("--format", required=True, choices=list(EXPORTERS))
    export.add_argument("-o", "--output", required=True, help="file (directory for --format tvm) to write")
    export.add_argument(
        "--encoding-version",
        default=VERSIONS[0],
        choices=VERSIONS,
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


def _analyze(subparsers) -> None:
    analyze = _command(
        subparsers,
        "analyze",
        commands.run_analyze,
        "per-layer sensitivity to LPBQ on calibration data, worst layer first (with a budget: the int8 choice)",
        "examples:\n  lpbq-tvm analyze model.onnx --calib calib.npz\n"
        "  lpbq-tvm analyze model.onnx --calib calib.npz --target-cosine 0.99\n",
    )
    _add_model_options(analyze)


def _report(subparsers) -> None:
    report = _command(
        subparsers,
        "report",
        commands.run_report,
        "quantize a model and write an HTML + Markdown report: layers, sizes, output agreement, plots",
        "example:\n  lpbq-tvm report model.onnx --calib calib.npz -o report/\n",
    )
    report.add_argument("-o", "--output", required=True, help="report directory to write")
    _add_model_options(report)


def _run(subparsers) -> None:
    run = _command(
        subparsers,
        "run",
        commands.run_run,
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


def _bench(subparsers) -> None:
    bench = _command(
        subparsers,
        "bench",
        commands.run_bench,
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
        choices=sorted(name for name, target in TARGETS.items() if "weight-only" in target.modes),
        help="what to build for (with --rpc: the device's architecture; default %(default)s)",
    )
    _add_model_options(bench)


def _check(subparsers) -> None:
    check = _command(
        subparsers,
        "check",
        commands.run_check,
        "pre-flight check of a QDQ ONNX model for Qualcomm's QNN toolchain (exit 1 when problems are found)",
        "example:\n  lpbq-tvm check model.qnn.onnx --for qnn\n",
    )
    check.add_argument("model", help="the ONNX model file")
    check.add_argument("--for", dest="target_toolchain", default="qnn", choices=["qnn"], help="toolchain to check for")


_GENERATE_EPILOG = """\
examples:
  lpbq-tvm generate model.onnx --tokenizer tokenizer.json --prompt "What is the capital of France?" --chat
  lpbq-tvm generate model.onnx --tokenizer tokenizer.json --prompt "Once upon a time" \\
      --mode w4a8 --calib-text corpus.txt --temperature 0.8 --top-p 0.95 --seed 1 --max-new-tokens 128

The model is a decoder-only causal LM exported to ONNX with a KV cache (inputs input_ids, attention_mask,
[position_ids], past_key_values.N.key / .value; outputs logits, present.N.key / .value; docs/llm.md).
Every MatMul (the LM head included) takes LPBQ unless --mode fp32; --chat wraps the prompt in a ChatML
user turn and stops at <|im_end|>. Text streams as it is generated; prefill and decode tokens/s follow.
"""

_PERPLEXITY_EPILOG = """\
example:
  lpbq-tvm perplexity model.onnx --tokenizer tokenizer.json --text book.txt --window 256 --max-tokens 4096

Consecutive windows of --window tokens, each scored as a new sequence (its first token context only).
"""


def _decoder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the ONNX decoder (docs/llm.md)")
    parser.add_argument("--tokenizer", required=True, help="its Hugging Face tokenizer.json")
    parser.add_argument("--mode", default="weight-only", choices=["fp32", *LPBQ_MODES], help="(default %(default)s)")
    parser.add_argument("--calib-text", metavar="FILE", help="text to calibrate activations on (w4a8 / w4a16)")
    parser.add_argument("--block-size", type=int, default=64, help="input channels per block (default %(default)s)")
    parser.add_argument(
        "--encoder", default="aimet", choices=list(ENCODERS), help="how scales are chosen (default %(default)s)"
    )
    parser.add_argument("--op-types", nargs="+", default=["MatMul"], metavar="OP", help="(default: MatMul)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="ONNX node names to keep in fp32")
    parser.add_argument(
        "--a16",
        type=re.compile,
        metavar="REGEX",
        help="in w4a8, 16-bit activations for the layers whose ONNX node name matches (e.g. mlp)",
    )


def _generate(subparsers) -> None:
    generate = _command(
        subparsers, "generate", llm_commands.run_generate, "generate text with a decoder LLM", _GENERATE_EPILOG
    )
    _decoder_options(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in a ChatML user turn")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")
    generate.add_argument("--stop", action="append", default=[], metavar="TOKEN", help="a stop token (repeatable)")
    generate.add_argument("--context", type=int, default=512, help="KV cache slots (default %(default)s)")
    generate.add_argument("--prefill", type=int, default=64, help="prefill graph positions (default %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default %(default)s)")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int)


def _perplexity(subparsers) -> None:
    perplexity = _command(
        subparsers,
        "perplexity",
        llm_commands.run_perplexity,
        "perplexity of a decoder LLM on a text file",
        _PERPLEXITY_EPILOG,
    )
    _decoder_options(perplexity)
    perplexity.add_argument("--text", required=True, metavar="FILE")
    perplexity.add_argument("--window", type=int, default=256, help="tokens per window (default %(default)s)")
    perplexity.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")


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


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", choices=sorted(TARGETS), help="where it runs (default %(default)s)")
    parser.add_argument(
        "--mode", default="weight-only", choices=list(LPBQ_MODES), help="kernel arithmetic (default %(default)s)"
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
