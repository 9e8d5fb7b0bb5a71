"""Deployment bundles: written from a compiled model, checked and loaded back, and the input check and
output conversion every runner of ``main`` shares (in process, from a bundle, over RPC).

A bundle is a directory (``lpbq-tvm compile``, :meth:`~lpbq_tvm.compiler.CompiledModel.export_bundle`)::

    bundle/
      model.so | model.tar   the library (a .tar of objects for a cross target without its linker)
      cpu_features.so        aarch64: a probe of the board's CPU features, run before the library
      params.bin             the weight parameters (tvm.runtime.save_param_dict), in call order
      manifest.json          target, mode, inputs/outputs, parameters, quantization, versions,
                             and the sha256 of every other file

It is filled in a temporary sibling directory renamed into place: a failed build leaves nothing.
Reading one checks every file against its sha256 and that its target runs here (an ``aarch64``
bundle belongs on the board); inputs are checked against the manifest before they reach the VM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.frontend import TensorInfo
from lpbq_tvm.huge_pages import huge_page_copies
from lpbq_tvm.io import atomic_directory, sha256
from lpbq_tvm.targets import get_target

__all__ = [
    "MANIFEST_FILE",
    "PARAMS_FILE",
    "LoadedBundle",
    "check_inputs",
    "load_bundle",
    "manifest",
    "numpy_view",
    "outputs_by_name",
    "read_manifest",
    "tensor_infos",
    "write_bundle",
]

PARAMS_FILE = "params.bin"
MANIFEST_FILE = "manifest.json"


def check_inputs(expected: Sequence[TensorInfo], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs in call order, as contiguous arrays, checked against names, shapes and dtypes."""
    names = [info.name for info in expected]
    if inputs.keys() != set(names):
        unknown = sorted(set(inputs) - set(names))
        missing = [name for name in names if name not in inputs]
        described = ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in expected)
        msg = f"inputs must be exactly: {described}"
        msg += f"; missing {', '.join(missing)}" if missing else ""
        msg += f"; unknown {', '.join(unknown)}" if unknown else ""
        raise ValueError(msg)
    values = []
    for info in expected:
        value = np.asarray(inputs[info.name], order="C")  # (ascontiguousarray would make a scalar 1-D)
        if value.shape != tuple(info.shape) or str(value.dtype) != info.dtype:
            msg = (
                f"input '{info.name}' must be {info.dtype} of shape {list(info.shape)}, "
                f"got {value.dtype} of shape {list(value.shape)}"
            )
            raise ValueError(msg)
        values.append(value)
    return values


def manifest(compiled) -> dict[str, Any]:
    """What a bundle's manifest.json holds for a :class:`~lpbq_tvm.compiler.CompiledModel`, without the file hashes."""
    versions = {name: metadata.version(name) for name in ("lpbq-tvm", "apache-tvm", "onnx", "numpy")}
    return {
        "target": compiled.target,
        "tvm_target": json.loads(str(get_target(compiled.target).tvm_target())),
        "mode": compiled.mode,
        "inputs": [asdict(info) for info in compiled.inputs],
        "outputs": [asdict(info) for info in compiled.outputs],
        "params": [
            {"name": name, "shape": [int(d) for d in param.shape], "dtype": str(param.dtype)}
            for name, param in zip(compiled.param_names, compiled.params, strict=True)
        ],
        "quantization": compiled.lowered,
        "weight_bytes": asdict(compiled.weight_bytes),
        "versions": versions,
    }


def write_bundle(compiled, directory: str | PathLike, *, overwrite: bool = False) -> Path:
    """Write the library, parameters and manifest of ``compiled`` into ``directory`` (module docstring)."""

    def fill(staging: Path) -> None:
        content = manifest(compiled) | get_target(compiled.target).write_library(compiled.executable, staging)
        params = dict(zip(compiled.param_names, compiled.params, strict=True))
        (staging / PARAMS_FILE).write_bytes(tvm.runtime.save_param_dict(params))
        content["files"] = {path.name: sha256(path) for path in sorted(staging.iterdir())}
        (staging / MANIFEST_FILE).write_text(json.dumps(content, indent=2) + "\n")

    return atomic_directory(directory, fill, overwrite=overwrite)


def read_manifest(directory: str | PathLike) -> dict[str, Any]:
    """A bundle's manifest, after checking every file against its sha256; ``ValueError`` otherwise."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: not a bundle (no {MANIFEST_FILE})")
    try:
        content = json.loads(manifest_path.read_text())
        files = content["files"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{manifest_path}: unreadable manifest ({error})") from error
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or sha256(path) != digest:
            raise ValueError(f"{directory}: {name} is missing or does not match the manifest's sha256")
    return content


def tensor_infos(entries: Sequence[Mapping[str, Any]]) -> list[TensorInfo]:
    """A manifest's ``inputs`` or ``outputs`` as :class:`~lpbq_tvm.frontend.TensorInfo`."""
    return [
        TensorInfo(entry["name"], tuple(entry["shape"]), entry["dtype"], entry.get("sequence", False))
        for entry in entries
    ]


def numpy_view(tensor: tvm.runtime.Tensor) -> np.ndarray:
    """A numpy array over ``tensor``'s memory (DLPack). numpy's DLPack has no bfloat16 or float8: those
    are viewed as unsigned integers of their width and reinterpreted as ml_dtypes' types, which is
    what numpy (and onnxruntime) use for them."""
    if str(tensor.dtype).startswith(("bfloat", "float8")):
        dtype = np.dtype(getattr(ml_dtypes, str(tensor.dtype)))
        return np.from_dlpack(tensor._create_view(tensor.shape, f"uint{8 * dtype.itemsize}")).view(dtype)
    return np.from_dlpack(tensor)


def outputs_by_name(result, outputs: Sequence[TensorInfo]) -> dict[str, np.ndarray | list[np.ndarray]]:
    """What ``main`` returned, as numpy copies by output name (the VM may reuse an output's memory in
    the next run); a sequence output as a list of arrays."""
    values = [result] if len(outputs) == 1 else list(result)
    return {
        info.name: [_copy(item) for item in value] if info.sequence else _copy(value)
        for info, value in zip(outputs, values, strict=True)
    }


def _copy(tensor: tvm.runtime.Tensor) -> np.ndarray:
    """A numpy copy: through DLPack for host memory, over the wire for a remote tensor."""
    return (
        numpy_view(tensor).copy()
        if tensor.device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        else tensor.numpy()
    )


class LoadedBundle:
    """A bundle's library, parameters and manifest, ready to run here."""

    def __init__(self, directory: Path, content: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = content
        self.inputs = tensor_infos(content["inputs"])
        device = get_target(content["target"]).device()
        if device is None:
            msg = f"{directory}: the bundle was built for {content['target']!r}, which does not run on this machine"
            raise ValueError(msg)
        params = tvm.runtime.load_param_dict((directory / PARAMS_FILE).read_bytes())
        self.params = huge_page_copies([params[p["name"]] for p in content["params"]])
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(directory / content["library"])), device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [tvm.runtime.tensor(value) for value in check_inputs(self.inputs, inputs)]
        return outputs_by_name(self._vm["main"](*tensors, *self.params), tensor_infos(self.manifest["outputs"]))


def load_bundle(directory: str | PathLike) -> LoadedBundle:
    """Check and load a bundle directory; ``ValueError`` names what is wrong with it."""
    return LoadedBundle(Path(directory), read_manifest(directory))
