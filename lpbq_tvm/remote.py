"""Run a deployment bundle on a remote device through TVM's RPC tracker (``tvm.rpc``).

``run_remote(bundle, "host:port", key, inputs)`` asks the tracker for a device registered under
``key`` (waiting at most ``timeout`` seconds for a free one), checks that the device's
architecture matches the bundle's target when the device can tell and that its CPU has the features
the library was built for (:meth:`~lpbq_tvm.targets.base.Target.check_device`), uploads the library, loads it
in the Relax VM there, copies the parameters and inputs over, runs and times ``main`` and brings
the outputs back. Nothing is written locally.

Trust model: an RPC server runs whatever library is uploaded to it. Start servers on devices
and networks you control; servers this project's tests start bind to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, rpc

from lpbq_tvm.bundle import PARAMS_FILE, check_inputs, outputs_by_name, read_manifest, tensor_infos
from lpbq_tvm.targets import get_target
from lpbq_tvm.timing import Timing

__all__ = ["RemoteRun", "parse_address", "run_remote"]


@dataclass(frozen=True)
class RemoteRun:
    outputs: dict[str, np.ndarray]
    timing: Timing  # of main on the device (median, min, max over the repeats)
    device: str  # the key and tracker the device came from


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RPC tracker address {address!r} is not HOST:PORT")
    return host, int(port)


def _request(tracker, key: str, timeout: float, address: str):
    """A session with a free device under ``key``, waiting at most ``timeout`` seconds."""
    result: dict = {}

    def request() -> None:
        try:
            result["session"] = tracker.request(key, priority=1, session_timeout=0, max_retry=1)
        except Exception as error:  # reported to the caller below
            result["error"] = error

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no free device under key {key!r} at {address} within {timeout:g} s")
    if "error" in result:
        raise ConnectionError(f"the tracker at {address} could not give a {key!r} device: {result['error']}")
    return result["session"]


def _architecture(triple: str) -> str:
    return triple.split("-", 1)[0]


def run_remote(
    bundle: str | PathLike,
    tracker: str,
    key: str,
    inputs: Mapping[str, np.ndarray],
    *,
    timeout: float = 60.0,
    repeat: int = 10,
) -> RemoteRun:
    """Run ``bundle`` on a device of the tracker; see the module docstring."""
    directory = Path(bundle)
    manifest = read_manifest(directory)
    values = check_inputs(tensor_infos(manifest["inputs"]), inputs)
    address = tracker
    host, port = parse_address(tracker)
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()  # fail fast, not after retries
        session_tracker = rpc.connect_tracker(host, port)
        summary = session_tracker.summary()
    except (OSError, RuntimeError) as error:
        raise ConnectionError(f"cannot reach the RPC tracker at {address}: {error}") from error
    keys = sorted(summary.get("queue_info", {}))
    if key not in keys:
        raise ValueError(f"no device is registered under key {key!r} at {address}; keys: {', '.join(keys) or 'none'}")
    remote = _request(session_tracker, key, timeout, address)
    bundle_triple = manifest["tvm_target"].get("mtriple") or tvm.target.codegen.llvm_get_system_triple()
    try:
        remote_triple = remote.get_function("target.llvm_get_system_triple")()
    except (AttributeError, RuntimeError):
        remote_triple = None  # a runtime-only server cannot tell; loading the library will check
    if remote_triple and _architecture(remote_triple) != _architecture(bundle_triple):
        msg = (
            f"the bundle is built for {_architecture(bundle_triple)} ({manifest['target']}), the device under "
            f"{key!r} is {_architecture(remote_triple)}"
        )
        raise ValueError(msg)
    get_target(manifest["target"]).check_device(remote, directory, manifest)
    library = directory / manifest["library"]
    try:
        remote.upload(str(library))
        executable = remote.load_module(library.name)
    except RuntimeError as error:
        raise RuntimeError(f"the device could not load {library.name}: {str(error).splitlines()[-1]}") from error
    device = remote.cpu()
    params = tvm.runtime.load_param_dict((directory / PARAMS_FILE).read_bytes())
    arguments = [tvm.runtime.tensor(value, device) for value in values]
    arguments += [tvm.runtime.tensor(params[p["name"]].numpy(), device) for p in manifest["params"]]
    machine = relax.VirtualMachine(executable, device)
    result = machine["main"](*arguments)
    timer = machine.time_evaluator("main", device, number=1, repeat=repeat)
    times = [1e3 * t for t in timer(*arguments).results]
    outputs = outputs_by_name(result, tensor_infos(manifest["outputs"]))
    return RemoteRun(outputs, Timing(float(np.median(times)), min(times), max(times)), f"{key} via {address}")
