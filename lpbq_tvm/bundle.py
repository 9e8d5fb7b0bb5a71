"""Load and run a deployment bundle (``lpbq-tvm compile`` / ``CompiledModel.export_bundle``) on this machine.

The manifest is checked first: every file's sha256, and that the bundle's target runs here (an
``aarch64`` bundle belongs on the board). Inputs are checked against the manifest's names,
shapes and dtypes before they reach the Relax VM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.compiler import MANIFEST_FILE, PARAMS_FILE
from lpbq_tvm.targets import get_target

__all__ = ["LoadedBundle", "check_inputs", "load_bundle", "read_manifest"]


class LoadedBundle:
    """A bundle's library, parameters and manifest, ready to run."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        device = get_target(manifest["target"]).device()
        if device is None:
            msg = f"{directory}: the bundle was built for {manifest['target']!r}, which does not run on this machine"
            raise ValueError(msg)
        params = tvm.runtime.load_param_dict((directory / PARAMS_FILE).read_bytes())
        self.params = [params[p["name"]] for p in manifest["params"]]
        self._vm = relax.VirtualMachine(tvm.runtime.load_module(str(directory / manifest["library"])), device)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [tvm.runtime.tensor(value) for value in check_inputs(self.manifest, inputs)]
        result = self._vm["main"](*tensors, *self.params)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return {info["name"]: value.numpy() for info, value in zip(self.manifest["outputs"], values, strict=True)}


def read_manifest(directory: str | PathLike) -> dict[str, Any]:
    """A bundle's manifest, after checking every file against its sha256; ``ValueError`` otherwise."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{directory}: not a bundle (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{manifest_path}: unreadable manifest ({error})") from error
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{directory}: {name} is missing or does not match the manifest's sha256")
    return manifest


def check_inputs(manifest: dict[str, Any], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs in call order, checked against the manifest's names, shapes and dtypes."""
    expected = manifest["inputs"]
    if sorted(inputs) != sorted(info["name"] for info in expected):
        names = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in expected)
        raise ValueError(f"inputs must be exactly: {names}; got {', '.join(sorted(inputs)) or 'none'}")
    values = []
    for info in expected:
        value = np.ascontiguousarray(inputs[info["name"]])
        if list(value.shape) != info["shape"] or str(value.dtype) != info["dtype"]:
            got = f"{value.dtype} {list(value.shape)}"
            raise ValueError(f"input '{info['name']}' must be {info['dtype']} {info['shape']}, got {got}")
        values.append(value)
    return values


def load_bundle(directory: str | PathLike) -> LoadedBundle:
    """Check and load a bundle directory; ``ValueError`` names what is wrong with it."""
    return LoadedBundle(Path(directory), read_manifest(directory))
