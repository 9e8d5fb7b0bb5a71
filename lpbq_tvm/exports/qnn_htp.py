"""Run a QNN ONNX export on Qualcomm's own HTP runtime: the x86-64 HTP simulator in ``onnxruntime-qnn``.

Needs the ``qnn`` extra (``pip install lpbq-tvm[qnn]``). The session registers the QNN plugin
execution provider, targets the HTP backend with ``soc_model`` 87 (the default v68 computes
uint16 x int8 about 20 LSB off), disables CPU fallback so nothing silently runs elsewhere, and
disables onnxruntime's ``MatMulAddFusion``. :func:`run_on_htp` runs in a fresh process so that the
QNN EP's verbose log (where ``LowPowerBlockQuantizedMatMulFusion`` announces each LPBQ MatMul) can
be read; a model the runtime rejects comes back with the reasons from that log.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = ["HTPRun", "htp_session", "run_on_htp"]

SOC_MODEL = "87"
LPBQ_FUSION = "LowPowerBlockQuantizedMatMulFusion"


def htp_session(model: str | PathLike | bytes, *, verbose: bool = False):
    """An onnxruntime session on the QNN HTP backend (simulator), CPU fallback disabled."""
    import onnxruntime as ort
    import onnxruntime_qnn

    if not any(device.ep_name == "QNNExecutionProvider" for device in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [device for device in ort.get_ep_devices() if device.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.log_severity_level = 0 if verbose else 3
    options.add_provider_for_devices(devices, {"backend_type": "htp", "soc_model": SOC_MODEL})
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, disabled_optimizers=["MatMulAddFusion"])


@dataclass(frozen=True)
class HTPRun:
    outputs: dict[str, np.ndarray] | None  # None when the runtime refused the model
    log: str
    providers: dict[str, list[str]]  # execution provider -> the nodes it ran

    @property
    def lpbq_fusions(self) -> frozenset[str]:
        """Names of the MatMul nodes the QNN EP fused as LPBQ. Its log lists each fusion's nodes
        (once per capability pass) under "Validation PASSED for 5 nodes in LowPowerBlock...Fusion"."""
        fused, in_fusion = set(), False
        for line in self.log.splitlines():
            if "Validation PASSED" in line or not line.startswith("\t"):
                in_fusion = f"in {LPBQ_FUSION}" in line
            elif in_fusion and (match := re.search(r"Operator type: MatMul Node name: (\S+)", line)):
                fused.add(match.group(1))
        return frozenset(fused)

    @property
    def reasons(self) -> list[str]:
        return [line.strip() for line in self.log.splitlines() if "REASON" in line or "Unsupported nodes" in line]


_CHILD = """
import json, sys
import numpy as np
from lpbq_tvm.exports.qnn_htp import htp_session
model, feeds, out = sys.argv[1:4]
session = htp_session(model, verbose=True)
with np.load(feeds) as archive:
    results = session.run(None, dict(archive))
np.savez(out, **{o.name: r for o, r in zip(session.get_outputs(), results)})
providers = {}
for group in session.get_provider_graph_assignment_info():
    providers.setdefault(group.ep_name, []).extend(node.name for node in group.get_nodes())
print("@@PROVIDERS " + json.dumps(providers), flush=True)
"""


def run_on_htp(model: str | PathLike, inputs: Mapping[str, np.ndarray], timeout: float = 600) -> HTPRun:
    """Run ``model`` once on the HTP simulator in a fresh process; outputs, verbose log and placement."""
    with tempfile.TemporaryDirectory() as scratch:
        feeds, out = Path(scratch) / "feeds.npz", Path(scratch) / "out.npz"
        np.savez(feeds, **inputs)
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model), str(feeds), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log = result.stdout + result.stderr
        if result.returncode != 0:
            return HTPRun(None, log, {})
        providers = json.loads(log.split("@@PROVIDERS ", 1)[1].splitlines()[0])
        with np.load(out) as archive:
            return HTPRun(dict(archive), log, providers)
