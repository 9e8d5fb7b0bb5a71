"""Compile a Relax module for a target, run it, and package it: the object ``lpbq_tvm.compile`` returns.

``build(mod, target)`` detaches the weight values from ``main`` (its ``"params"`` attribute),
compiles with ``tvm.compile`` and wraps the executable in a :class:`CompiledModel` that runs on
named numpy inputs (when the target runs on this machine), reports its weight bytes and writes a
deployment bundle::

    bundle/
      model.so | model.tar   the library (a .tar of objects for cross targets)
      params.bin             the weight parameters (tvm.runtime.save_param_dict), in call order
      manifest.json          target, mode, inputs/outputs, parameters, quantization, versions,
                             and the sha256 of every other file
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import detach_params

from lpbq_tvm.frontend import TensorInfo
from lpbq_tvm.passes.lower_lpbq import LOWERED_ATTR
from lpbq_tvm.targets import get_target
from lpbq_tvm.targets.cpu_schedules import cpu_pipeline

__all__ = [
    "CompiledModel",
    "atomic_write",
    "build",
    "compile",
    "lower",
    "tuning_database",
    "PARAMS_FILE",
    "MANIFEST_FILE",
]

PARAMS_FILE = "params.bin"
MANIFEST_FILE = "manifest.json"


def _writable(path: str | PathLike, overwrite: bool) -> Path:
    """``path`` if it may be written: not existing (or ``overwrite``), and never a symlink."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; refusing to write through it")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file where a folder of the path should be
        raise NotADirectoryError(f"cannot write {path}: {error.filename} is not a directory") from error
    return path


def atomic_write(path: str | PathLike, write: Callable[[str], Any], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename the file into ``path``; never clobbers unless asked."""
    path = _writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_directory(path: str | PathLike, fill: Callable[[Path], Any], *, overwrite: bool = False) -> Path:
    """Fill a temporary sibling directory, then rename it to ``path``: a failure leaves nothing behind."""
    path = _writable(path, overwrite)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        fill(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weight parameters of a compiled model, by kind."""

    lpbq_packed: int  # q and k-1 nibbles and fp32 scales of lowered layers
    float: int  # weights that stayed fp32

    @property
    def total(self) -> int:
        return self.lpbq_packed + self.float


class CompiledModel:
    """A compiled Relax module with its weight values, run with named numpy inputs."""

    def __init__(
        self,
        executable: relax.VMExecutable,
        params: list[tvm.runtime.Tensor],
        param_names: list[str],
        inputs: Sequence[TensorInfo],
        outputs: Sequence[TensorInfo],
        target: str,
        mode: str,
        lowered: Mapping[str, Mapping],
    ) -> None:
        self.executable = executable
        self.params = params
        self.param_names = param_names
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.target = target
        self.mode = mode
        self.lowered = dict(lowered)
        self._vm: relax.VirtualMachine | None = None
        self._main = None  # the VM's main function, looked up once
        self._buffers: list[tvm.runtime.Tensor] = []  # aligned device inputs, refilled by each run
        self._views: list[np.ndarray] = []

    @property
    def weight_bytes(self) -> WeightBytes:
        packed_names = {name for entry in self.lowered.values() for name in entry.get("params", ())}
        sizes = {
            name: int(np.prod(param.shape)) * np.dtype(str(param.dtype)).itemsize
            for name, param in zip(self.param_names, self.params, strict=True)
        }
        packed = sum(size for name, size in sizes.items() if name in packed_names)
        return WeightBytes(lpbq_packed=packed, float=sum(sizes.values()) - packed)

    def _machine(self) -> relax.VirtualMachine:
        if self._vm is None:
            device = get_target(self.target).device()
            if device is None:
                msg = (
                    f"this model was built for target {self.target!r}, which does not run on this machine; "
                    "write it with export_bundle() and run it on the device"
                )
                raise RuntimeError(msg)
            self._vm = relax.VirtualMachine(self.executable, device)
            self._main = self._vm["main"]
            self._buffers = [tvm.runtime.empty(info.shape, info.dtype, device) for info in self.inputs]
            self._views = [np.from_dlpack(buffer) for buffer in self._buffers]  # numpy views of their memory
        return self._vm

    def _input_tensors(self, inputs: Mapping[str, np.ndarray]) -> list[tvm.runtime.Tensor]:
        expected = [info.name for info in self.inputs]
        if inputs.keys() != set(expected):
            unknown = sorted(set(inputs) - set(expected))
            missing = [name for name in expected if name not in inputs]
            described = ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in self.inputs)
            msg = f"inputs must be exactly: {described}"
            msg += f"; missing {', '.join(missing)}" if missing else ""
            msg += f"; unknown {', '.join(unknown)}" if unknown else ""
            raise ValueError(msg)
        self._machine()
        for info, view in zip(self.inputs, self._views, strict=True):
            value = np.asarray(inputs[info.name])
            if value.shape != view.shape or value.dtype != view.dtype:
                msg = (
                    f"input '{info.name}' must be {info.dtype} of shape {list(info.shape)}, "
                    f"got {value.dtype} of shape {list(value.shape)}"
                )
                raise ValueError(msg)
            # Copied into aligned buffers kept across runs: raw numpy memory may be misaligned, and a
            # fresh tensor per run costs more than the kernels of a small layer. Through a numpy view of
            # each buffer: np.copyto takes 0.5 us for 6 KB here, Tensor.copyfrom 6 us.
            np.copyto(view, value)
        return self._buffers

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name (dtypes and shapes must match ``inputs``). Not for
        concurrent use from several threads: the input buffers are shared between runs."""
        tensors = self._input_tensors(inputs)
        result = self._main(*tensors, *self.params)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        # Copies (the VM may reuse an output's memory in the next run), via DLPack: 0.7 vs 8 us for Tensor.numpy()
        return {info.name: np.from_dlpack(value).copy() for info, value in zip(self.outputs, values, strict=True)}

    def export_library(self, path: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write the executable as a library (``.so``, or ``.tar`` of objects); weights are not inside."""
        return atomic_write(path, self.executable.export_library, overwrite=overwrite)

    def manifest(self) -> dict[str, Any]:
        """What a bundle's manifest.json holds, without the file hashes."""
        versions = {name: metadata.version(name) for name in ("lpbq-tvm", "apache-tvm", "onnx", "numpy")}
        return {
            "target": self.target,
            "tvm_target": json.loads(str(get_target(self.target).tvm_target())),
            "mode": self.mode,
            "inputs": [asdict(info) for info in self.inputs],
            "outputs": [asdict(info) for info in self.outputs],
            "params": [
                {"name": name, "shape": [int(d) for d in param.shape], "dtype": str(param.dtype)}
                for name, param in zip(self.param_names, self.params, strict=True)
            ],
            "quantization": {key: _plain(entry) for key, entry in self.lowered.items()},
            "weight_bytes": asdict(self.weight_bytes),
            "versions": versions,
        }

    def export_bundle(self, directory: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write library, parameters and manifest into ``directory`` (see the module docstring)."""
        library_name = get_target(self.target).LIBRARY_NAME

        def fill(staging: Path) -> None:
            self.executable.export_library(str(staging / library_name))
            params = {name: param for name, param in zip(self.param_names, self.params, strict=True)}
            (staging / PARAMS_FILE).write_bytes(tvm.runtime.save_param_dict(params))
            manifest = self.manifest()
            manifest["library"] = library_name
            manifest["files"] = {name: _sha256(staging / name) for name in (library_name, PARAMS_FILE)}
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

        return atomic_directory(directory, fill, overwrite=overwrite)


def _plain(value: Any) -> Any:
    """TVM containers (Map, Array, String) as plain JSON-able Python values."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def build(
    mod: tvm.IRModule,
    target: str = "cpu",
    inputs: Sequence[TensorInfo] | None = None,
    outputs: Sequence[TensorInfo] | None = None,
    mode: str = "fp32",
    tuning_db: str | PathLike | None = None,
) -> CompiledModel:
    """Compile ``mod["main"]`` for ``target``; input/output infos default to the function's own.

    ``tuning_db``: a MetaSchedule database directory written by :func:`lpbq_tvm.tuning.tune`; its
    schedules replace the default ones for the kernels it holds."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
    lowered = _plain(main.attrs[LOWERED_ATTR]) if LOWERED_ATTR in (main.attrs or {}) else {}
    if inputs is None:
        inputs = [
            TensorInfo(p.name, tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in main.params[:num_input]
        ]
    if outputs is None:
        returned = main.ret_ty.fields if isinstance(main.ret_ty, relax.TupleType) else [main.ret_ty]
        outputs = [
            TensorInfo(f"output{i}", tuple(int(d) for d in t.shape), str(t.dtype)) for i, t in enumerate(returned)
        ]
    detached, params = detach_params(mod)
    param_names = [p.name for p in main.params[num_input:]]
    tvm_target = get_target(target).tvm_target()
    if tuning_db is None:
        executable = tvm.compile(detached, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
    else:
        database = tuning_database(tuning_db)
        with database:
            executable = tvm.compile(detached, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target, database))
    return CompiledModel(executable, list(params.get("main", [])), param_names, inputs, outputs, target, mode, lowered)


def tuning_database(directory: str | PathLike):
    """The MetaSchedule JSON database in ``directory`` (workload and tuning-record files)."""
    from tvm.s_tir import meta_schedule as ms

    directory = Path(directory)
    files = [directory / "database_workload.json", directory / "database_tuning_record.json"]
    if not all(file.is_file() for file in files):
        raise FileNotFoundError(f"{directory} holds no tuning database (run lpbq-tvm tune first)")
    return ms.database.JSONDatabase(*map(str, files), allow_missing=False)


def lower(
    sim, target: str = "cpu", mode: str = "weight-only", *, quantize_all_activations: bool = True
) -> tvm.IRModule:
    """The Relax module :func:`compile` builds: the float model (``"fp32"``) or the LPBQ-lowered one,
    its 2-D convs in NHWC where the target wants channels last."""
    from lpbq_tvm.passes.channels_last import ChannelsLast
    from lpbq_tvm.passes.lower_lpbq import MODES, LowerLPBQ

    target_module = get_target(target)
    if not quantize_all_activations and not target_module.REQUANTIZE_OUTPUTS:
        msg = f"quantize_all_activations=False selects an htp-sim graph; target {target!r} has no such choice"
        raise ValueError(msg)
    layout = ChannelsLast() if target_module.CHANNELS_LAST else tvm.transform.Sequential([])
    if mode == "fp32":
        return layout(sim.float_module)
    if mode not in target_module.MODES:
        msg = f"target {target!r} builds modes {', '.join(target_module.MODES)} (and fp32), not {mode!r}"
        raise ValueError(msg)
    if not sim.has_encodings:
        sim.compute_encodings()
    if mode != "weight-only" and not sim.is_calibrated:
        msg = (
            f"mode {mode} quantizes activations and needs their ranges: run "
            "sim.compute_encodings(callback, args) with a callback that feeds calibration data through sim.run"
        )
        raise ValueError(msg)
    if target_module.REQUANTIZE_OUTPUTS:  # HTP semantics: the graph of the QNN export
        module = sim.qdq_module(MODES[mode], quantize_all_activations)
    else:
        module = sim.encoded_module
    return LowerLPBQ(mode, target_module.REQUANTIZE_OUTPUTS, target_module.tvm_target())(layout(module))


def compile(  # noqa: A001 - public API name
    sim,
    target: str = "cpu",
    mode: str = "weight-only",
    tuning_db: str | PathLike | None = None,
    *,
    quantize_all_activations: bool = True,
) -> CompiledModel:
    """Compile a :class:`~lpbq_tvm.quantsim.QuantizationSimModel` for ``target``.

    Modes: ``"weight-only"`` (fp32 activations, 4-bit packed-weight kernels), ``"w4a8"`` /
    ``"w4a16"`` (integer kernels; need calibrated activation ranges from
    ``sim.compute_encodings(callback, args)``) and ``"fp32"`` (the unquantized model, for
    comparisons). Targets: see :mod:`lpbq_tvm.targets` (``"cpu"``, ``"aarch64"``, ``"htp-sim"``).
    ``htp-sim`` compiles the graph of the QNN export, every activation through ``Q -> DQ``; with
    ``quantize_all_activations=False`` only the LPBQ layers' inputs and outputs, as the export of
    that option. Weights are encoded first if ``sim.compute_encodings`` has not run. ``tuning_db``:
    see :func:`build`.
    """
    module = lower(sim, target, mode, quantize_all_activations=quantize_all_activations)
    return build(module, target, sim.inputs, sim.outputs, mode, tuning_db)
