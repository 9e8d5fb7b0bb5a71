"""The emulated aarch64 device of ``tools/arm64_device.sh`` for tests: a tracker on 127.0.0.1 and emulated
RPC servers registered with it, one per emulated CPU.

``tools/arm64_device.sh setup`` (run by ``.ci/run``) installs qemu, the cross linker and the device's
rootfs. Without them the tests that need the device skip with the command to run, except under ``CI``,
where they fail: CI installs them, so their absence there is a failure, not a reason to skip.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tvm
from system_tools import missing_tool
from tvm import relax, rpc
from tvm.rpc.tracker import Tracker

from lpbq_tvm.targets import get_target

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "arm64_device.sh"
# QEMU_CPU of each device: "max" has NEON, dotprod and i8mm; a Cortex-A53 has NEON only.
CPUS = {"arm64": "max", "arm64-a53": "cortex-a53"}


def require_device() -> None:
    """Skip (fail under CI) unless the emulator, the cross linker and the device's rootfs are installed."""
    missing = [tool for tool in ("qemu-aarch64-static", "aarch64-linux-gnu-g++") if shutil.which(tool) is None]
    ready = os.geteuid() == 0 and not missing and _rootfs_ready()
    if not ready:
        missing_tool(f"needs the emulated aarch64 device: run {SCRIPT.relative_to(SCRIPT.parents[1])} setup as root")


def _rootfs_ready() -> bool:
    result = subprocess.run(["bash", str(SCRIPT), "python", "-c", "pass"], capture_output=True, timeout=300)
    return result.returncode == 0


@contextmanager
def emulated_devices(timeout: float = 240.0):
    """A tracker with one emulated server per key of :data:`CPUS`; yields its address."""
    tracker = Tracker(host="127.0.0.1", port=19900, port_end=19950, silent=True)
    address = f"127.0.0.1:{tracker.port}"
    servers = []
    try:
        for index, (key, cpu) in enumerate(CPUS.items()):
            port = str(20000 + 100 * index)
            command = ["bash", str(SCRIPT), "rpc-server", "--tracker", address, "--key", key, "--port", port]
            env = os.environ | {"QEMU_CPU": cpu}
            # A session of its own: the server's worker processes are stopped with it (killpg below).
            servers.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
                )
            )
        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        deadline = time.monotonic() + timeout
        while not set(CPUS) <= set(client.summary()["queue_info"]):
            if time.monotonic() > deadline or any(server.poll() is not None for server in servers):
                raise RuntimeError(f"the emulated devices did not register with {address}")
            time.sleep(0.5)
        yield address
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        tracker.terminate()


class Session:
    """One RPC session on an emulated device, running compiled models (:class:`~lpbq_tvm.compiler.CompiledModel`)."""

    def __init__(self, tracker: str, key: str, scratch: Path) -> None:
        host, port = tracker.rsplit(":", 1)
        self.remote = rpc.connect_tracker(host, int(port)).request(key, session_timeout=0)
        self.scratch = scratch

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        del self.remote  # closes the connection: the server serves the next session
        gc.collect()

    def _upload(self, module) -> tvm.runtime.Module:
        library = self.scratch / f"lib{len(list(self.scratch.iterdir()))}.so"
        module.export_library(str(library), fcompile=get_target("aarch64").linker())
        self.remote.upload(str(library))
        return self.remote.load_module(library.name)

    def call(self, func: tvm.tirx.PrimFunc, target, arrays: list[np.ndarray], out_shape) -> np.ndarray:
        """``func(*arrays, out)`` built for ``target`` and run on the device: ``out`` float32 of ``out_shape``."""
        kernel = self._upload(tvm.compile(tvm.IRModule({"main": func}), target))["main"]
        device = self.remote.cpu()
        out = tvm.runtime.empty(tuple(out_shape), "float32", device)
        kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays], out)
        return out.numpy()

    def run(self, compiled, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """The outputs of ``compiled`` on the device for each input dict, in output order."""
        device = self.remote.cpu()
        machine = relax.VirtualMachine(self._upload(compiled.executable), device)
        params = [tvm.runtime.tensor(param.numpy(), device) for param in compiled.params]
        results = []
        for values in inputs:
            arguments = [tvm.runtime.tensor(values[info.name], device) for info in compiled.inputs]
            result = machine["main"](*arguments, *params)
            results.append([t.numpy() for t in ([result] if len(compiled.outputs) == 1 else result)])
        return results
