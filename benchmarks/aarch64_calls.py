"""Runs on the (emulated) aarch64 board, under the instruction-counting plugin: calls one model a given
number of times, then saves the process's memory map, which tells whose code each counted block was.

    python3 aarch64_calls.py tvm BUNDLE_DIR INPUTS.npz CALLS MAPS_OUT
    python3 aarch64_calls.py ort MODEL.onnx INPUTS.npz CALLS MAPS_OUT [CONFIG_KEY=VALUE ...]

Needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``: no ``tvm.relax``) or onnxruntime, and numpy.
Used by ``bench_aarch64.py``.
"""

import json
import sys
from pathlib import Path

import numpy as np


def tvm_calls(bundle: Path, inputs: dict, calls: int) -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    manifest = json.loads((bundle / "manifest.json").read_text())
    params = tvm.runtime.load_param_dict((bundle / "params.bin").read_bytes())
    machine = VirtualMachine(tvm.runtime.load_module(str(bundle / manifest["library"])), tvm.cpu())
    arguments = [tvm.runtime.tensor(inputs[entry["name"]]) for entry in manifest["inputs"]]
    arguments += [params[entry["name"]] for entry in manifest["params"]]
    for _ in range(calls):
        machine["main"](*arguments)


def ort_calls(model: Path, inputs: dict, calls: int, config: list[str]) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for entry in config:
        key, value = entry.split("=", 1)
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        session.run(None, inputs)


def main() -> None:
    kind, path, inputs_file, calls, maps_out, *config = sys.argv[1:]
    with np.load(inputs_file) as saved:
        inputs = dict(saved)
    if kind == "tvm":
        tvm_calls(Path(path), inputs, int(calls))
    else:
        ort_calls(Path(path), inputs, int(calls), config)
    Path(maps_out).write_text(Path("/proc/self/maps").read_text())


if __name__ == "__main__":
    main()
