"""Runs on the aarch64 board (or the emulated one of ``arm64_device.sh``), with nothing but numpy and TVM's
runtime (``TVM_USE_RUNTIME_LIB=1``: no ``tvm.relax``) or onnxruntime: calls a model, saves what it returned.

    python3 board_run.py tvm BUNDLE_DIR INPUTS.npz [--calls N] [--outputs OUT.npz] [--maps MAPS]
    python3 board_run.py ort MODEL.onnx INPUTS.npz [--calls N] [--maps MAPS] [--config KEY=VALUE ...]

``tvm`` loads an lpbq_tvm bundle (manifest, parameters, linked library) into the Relax VM and runs
``main``; ``ort`` runs an ONNX model on onnxruntime's CPU provider, one thread. ``--outputs`` saves the
last call's outputs by name; ``--maps`` saves the process's memory map after the calls (which tells the
instruction-counting benchmark whose code each counted block was). ``arm64_device.sh run`` and
``benchmarks/bench_aarch64.py`` use it.
"""

import argparse
import json
from pathlib import Path

import numpy as np


def tvm_calls(bundle: Path, inputs: dict, calls: int) -> dict:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    manifest = json.loads((bundle / "manifest.json").read_text())
    if any(entry.get("sequence") for entry in manifest["outputs"]):
        raise SystemExit("board_run.py: sequence outputs are not supported")
    params = tvm.runtime.load_param_dict((bundle / "params.bin").read_bytes())
    machine = VirtualMachine(tvm.runtime.load_module(str(bundle / manifest["library"])), tvm.cpu())
    arguments = [tvm.runtime.tensor(inputs[entry["name"]]) for entry in manifest["inputs"]]
    arguments += [params[entry["name"]] for entry in manifest["params"]]
    for _ in range(calls):
        result = machine["main"](*arguments)
    results = [result] if len(manifest["outputs"]) == 1 else list(result)
    return {entry["name"]: value.numpy() for entry, value in zip(manifest["outputs"], results, strict=True)}


def ort_calls(model: Path, inputs: dict, calls: int, config: list) -> dict:
    import onnxruntime as ort

    ort.disable_telemetry_events()  # a telemetry thread runs in onnxruntime's library at its own pace
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    for entry in config:
        key, value = entry.split("=", 1)
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        outputs = session.run(None, inputs)
    return {output.name: value for output, value in zip(session.get_outputs(), outputs, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Call a model on the board and save what it returned.")
    parser.add_argument("kind", choices=["tvm", "ort"])
    parser.add_argument("model", type=Path, help="the bundle directory (tvm) or the .onnx file (ort)")
    parser.add_argument("inputs", help="an .npz with one array per model input")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--outputs", help="save the outputs here (.npz)")
    parser.add_argument("--maps", help="save /proc/self/maps here after the calls")
    parser.add_argument("--config", nargs="*", default=[], help="onnxruntime session config entries KEY=VALUE")
    args = parser.parse_args()
    with np.load(args.inputs) as saved:
        inputs = dict(saved)
    if args.kind == "tvm":
        outputs = tvm_calls(args.model, inputs, args.calls)
    else:
        outputs = ort_calls(args.model, inputs, args.calls, args.config)
    if args.maps:
        Path(args.maps).write_text(Path("/proc/self/maps").read_text())
    if args.outputs:
        np.savez(args.outputs, **outputs)


if __name__ == "__main__":
    main()
