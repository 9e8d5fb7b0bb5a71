"""Compile a quantization simulation for a target, and the object ``lpbq_tvm.compile`` returns.

:func:`lower` turns a :class:`~lpbq_tvm.quantsim.QuantizationSimModel` into the Relax module a
target builds (the fp32 model, or the LPBQ-lowered one with the target's kernels); :func:`build`
detaches the weight values from ``main`` (its ``"params"`` attribute), compiles with the target's
Relax pipeline and wraps the executable in a :class:`CompiledModel`, which runs on named numpy
inputs (where the target runs on this machine), reports its weight bytes and writes a deployment
bundle (:mod:`lpbq_tvm.bundle`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import detach_params

from lpbq_tvm.attrs import LOWERED_ATTR, num_inputs
from lpbq_tvm.bundle import check_inputs, numpy_view, outputs_by_name, write_bundle
from lpbq_tvm.frontend import TensorInfo
from lpbq_tvm.huge_pages import huge_page_copies
from lpbq_tvm.io import atomic_write
from lpbq_tvm.modes import FLOAT_MODE, activation_bits, needs_calibration
from lpbq_tvm.passes.channels_last import ChannelsLast
from lpbq_tvm.passes.lower_lpbq import LowerLPBQ
from lpbq_tvm.passes.merge_sibling_layers import MergeSiblingLayers
from lpbq_tvm.targets import get_target

__all__ = ["CompiledModel", "WeightBytes", "build", "compile", "lower", "tuning_database"]


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
        self._device = None
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

    def load(self) -> CompiledModel:
        """Load the executable into a virtual machine now, not at the first run: loading compiles the kernels'
        LLVM code to machine code (seconds for a large model), which a first run would otherwise be timed with.
        Returns this model."""
        self._machine()
        return self

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
            self._device = device
        return self._vm

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Outputs by name for inputs by name (dtypes and shapes must match ``inputs``; a sequence output
        is a list). Not for concurrent use from several threads: the input buffers are shared between runs."""
        values = check_inputs(self.inputs, inputs)
        self._machine()
        # Copied into aligned buffers kept across runs, through numpy views of their memory: raw numpy
        # memory may be misaligned, and a fresh tensor per run costs more than a small layer's kernels.
        # Made at the first run, not at load: a caller of invoke() (a decode step) keeps its own inputs.
        if not self._buffers:
            self._buffers = [tvm.runtime.empty(info.shape, info.dtype, self._device) for info in self.inputs]
            self._views = [numpy_view(buffer) for buffer in self._buffers]
        for value, view in zip(values, self._views, strict=True):
            np.copyto(view, value)
        return outputs_by_name(self._main(*self._buffers, *self.params), self.outputs)

    def invoke(self, *arguments: tvm.runtime.Tensor):
        """``main`` on device tensors (the model inputs, in order) and the weights, returning TVM's outputs:
        no copies, for callers that keep their inputs on the device (:mod:`lpbq_tvm.llm`'s KV caches)."""
        self._machine()
        return self._main(*arguments, *self.params)

    def export_library(self, path: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write the executable as a library (``.so`` linked for the target, or ``.tar`` of objects); weights are
        not inside."""
        linker = None if str(path).endswith(".tar") else get_target(self.target).linker()
        write = functools.partial(self.executable.export_library, fcompile=linker)
        return atomic_write(path, write, overwrite=overwrite)

    def export_bundle(self, directory: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write library, parameters and manifest into ``directory`` (:mod:`lpbq_tvm.bundle`)."""
        return write_bundle(self, directory, overwrite=overwrite)


def _plain(value: Any) -> Any:
    """TVM containers (Map, Array, String) as plain JSON-able Python values."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def _static(dim) -> int | None:
    """A Relax shape dimension as an int, or None where it is symbolic."""
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


def build(
    mod: tvm.IRModule,
    target: str = "cpu",
    inputs: Sequence[TensorInfo] | None = None,
    outputs: Sequence[TensorInfo] | None = None,
    mode: str = FLOAT_MODE,
    tuning_db: str | PathLike | None = None,
    pipeline: str | tvm.transform.Pass | None = None,
) -> CompiledModel:
    """Compile ``mod["main"]`` for ``target``; input/output infos default to the function's own.

    ``pipeline``: the Relax pipeline to compile with, by default the target's own; a pass test gives
    another (e.g. TVM's ``"default"``) so that the pass under test is the only rewrite applied.
    ``tuning_db``: a MetaSchedule database directory written by :func:`lpbq_tvm.tuning.tune`; its
    schedules replace the target pipeline's own for the kernels it holds."""
    main = mod["main"]
    num_input = num_inputs(main)
    lowered = _plain(main.attrs[LOWERED_ATTR]) if LOWERED_ATTR in (main.attrs or {}) else {}
    if inputs is None:
        inputs = [
            TensorInfo(p.name, tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in main.params[:num_input]
        ]
    if outputs is None:
        returned = main.ret_ty.fields if isinstance(main.ret_ty, relax.TupleType) else [main.ret_ty]
        outputs = [
            TensorInfo(f"output{i}", tuple(_static(d) for d in t.shape), str(t.dtype)) for i, t in enumerate(returned)
        ]
    detached, params = detach_params(mod)
    param_names = [p.name for p in main.params[num_input:]]
    target_kind = get_target(target)
    tvm_target = target_kind.tvm_target()
    if tuning_db is None:
        executable = tvm.compile(
            detached, target=tvm_target, relax_pipeline=pipeline or target_kind.pipeline(tvm_target)
        )
    else:
        database = tuning_database(tuning_db)
        with database:
            executable = tvm.compile(
                detached, target=tvm_target, relax_pipeline=pipeline or target_kind.pipeline(tvm_target, database)
            )
    weights = huge_page_copies(params.get("main", []))  # read once per run: keep them off 4 KiB pages
    return CompiledModel(executable, weights, param_names, inputs, outputs, target, mode, lowered)


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
    its 2-D convs in NHWC where the target wants channels last, its LPBQ layers on the target's kernels
    (dense layers reading the same input as one, where the target does not requantize each layer)."""
    target_kind = get_target(target)
    if not quantize_all_activations and not target_kind.requantize_outputs:
        msg = f"quantize_all_activations=False selects an htp-sim graph; target {target!r} has no such choice"
        raise ValueError(msg)
    layout = ChannelsLast() if target_kind.channels_last else tvm.transform.Sequential([])
    if mode == FLOAT_MODE:
        return layout(sim.float_module)
    if mode not in target_kind.modes:
        msg = f"target {target!r} builds modes {', '.join(target_kind.modes)} (and fp32), not {mode!r}"
        raise ValueError(msg)
    module = sim.encoded_module  # raises, naming the call to make, before compute_encodings
    if needs_calibration(mode) and not sim.is_calibrated:
        msg = (
            f"mode {mode} quantizes activations and needs their ranges: run "
            "sim.compute_encodings(callback, args) with a callback that feeds calibration data through sim.run"
        )
        raise ValueError(msg)
    if target_kind.requantize_outputs:  # HTP semantics: the graph of the QNN export, one layer per node
        module = sim.qdq_module(activation_bits(mode), quantize_all_activations)
    else:
        module = MergeSiblingLayers()(module)
    tvm_target = target_kind.tvm_target()
    lowering = LowerLPBQ(mode, target_kind.requantize_outputs, target_kind.kernel_provider(tvm_target))
    return lowering(layout(module))


def compile(  # noqa: A001 - public API name
    sim,
    target: str = "cpu",
    mode: str = "weight-only",
    tuning_db: str | PathLike | None = None,
    *,
    quantize_all_activations: bool = True,
) -> CompiledModel:
    """Compile a :class:`~lpbq_tvm.quantsim.QuantizationSimModel` for ``target``.

    Modes (:mod:`lpbq_tvm.modes`): ``"weight-only"`` (fp32 activations, 4-bit packed-weight
    kernels), ``"w4a8"`` / ``"w4a16"`` (integer kernels; need calibrated activation ranges from
    ``sim.compute_encodings(callback, args)``) and ``"fp32"`` (the unquantized model, for
    comparisons). Targets: :data:`lpbq_tvm.targets.TARGETS` (``"cpu"``, ``"aarch64"``, ``"htp-sim"``).
    ``htp-sim`` compiles the graph of the QNN export, every activation through ``Q -> DQ``; with
    ``quantize_all_activations=False`` only the LPBQ layers' inputs and outputs, as the export of
    that option. Every mode but fp32 needs ``sim.compute_encodings`` to have run. ``tuning_db``:
    see :func:`build`.
    """
    module = lower(sim, target, mode, quantize_all_activations=quantize_all_activations)
    return build(module, target, sim.inputs, sim.outputs, mode, tuning_db)
