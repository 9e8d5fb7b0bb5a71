"""Compile a Relax module for a target and run it: the object ``lpbq_tvm.compile`` returns.

``build(mod, target)`` detaches the weight values from ``main`` (its ``"params"`` attribute),
compiles with ``tvm.compile`` and wraps the executable in a :class:`CompiledModel` that runs
on named numpy inputs, reports its weight bytes and exports a shared library.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import detach_params

from lpbq_tvm.frontend import TensorInfo
from lpbq_tvm.passes.lower_lpbq import LOWERED_ATTR
from lpbq_tvm.targets import get_target

__all__ = ["CompiledModel", "atomic_write", "build", "compile"]


def atomic_write(path: str | PathLike, write, *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename the file into ``path``; never clobbers unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
        lowered: Mapping[str, Mapping],
    ) -> None:
        self.executable = executable
        self.params = params
        self.param_names = param_names
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.target = target
        self.lowered = dict(lowered)
        self._device = get_target(target).device()
        self._vm = relax.VirtualMachine(executable, self._device)

    @property
    def weight_bytes(self) -> WeightBytes:
        packed_names = {name for entry in self.lowered.values() for name in entry.get("params", ())}
        sizes = {
            name: int(np.prod(param.shape)) * np.dtype(str(param.dtype)).itemsize
            for name, param in zip(self.param_names, self.params, strict=True)
        }
        packed = sum(size for name, size in sizes.items() if name in packed_names)
        return WeightBytes(lpbq_packed=packed, float=sum(sizes.values()) - packed)

    def _input_tensors(self, inputs: Mapping[str, np.ndarray]) -> list[tvm.runtime.Tensor]:
        expected = {info.name: info for info in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = [name for name in expected if name not in inputs]
        if unknown or missing:
            described = ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in self.inputs)
            msg = f"inputs must be exactly: {described}"
            msg += f"; missing {', '.join(missing)}" if missing else ""
            msg += f"; unknown {', '.join(unknown)}" if unknown else ""
            raise ValueError(msg)
        tensors = []
        for info in self.inputs:
            value = np.asarray(inputs[info.name])
            if value.shape != info.shape or value.dtype != np.dtype(info.dtype):
                msg = (
                    f"input '{info.name}' must be {info.dtype} of shape {list(info.shape)}, "
                    f"got {value.dtype} of shape {list(value.shape)}"
                )
                raise ValueError(msg)
            # tvm.runtime.tensor copies into an aligned buffer; raw numpy buffers may be misaligned.
            tensors.append(tvm.runtime.tensor(np.ascontiguousarray(value), device=self._device))
        return tensors

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name (dtypes and shapes must match ``inputs``)."""
        result = self._vm["main"](*self._input_tensors(inputs), *self.params)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return {info.name: value.numpy() for info, value in zip(self.outputs, values, strict=True)}

    def export_library(self, path: str | PathLike, *, overwrite: bool = False) -> Path:
        """Write the executable as a shared library (weights are not inside; see ``params``)."""
        return atomic_write(path, self.executable.export_library, overwrite=overwrite)


def build(
    mod: tvm.IRModule,
    target: str = "cpu",
    inputs: Sequence[TensorInfo] | None = None,
    outputs: Sequence[TensorInfo] | None = None,
) -> CompiledModel:
    """Compile ``mod["main"]`` for ``target``; input/output infos default to the function's own."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
    lowered = {str(k): v for k, v in main.attrs[LOWERED_ATTR].items()} if LOWERED_ATTR in (main.attrs or {}) else {}
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
    executable = tvm.compile(detached, target=get_target(target).tvm_target())
    return CompiledModel(executable, list(params.get("main", [])), param_names, inputs, outputs, target, lowered)


def compile(sim, target: str = "cpu", mode: str = "weight-only") -> CompiledModel:  # noqa: A001 - public API name
    """Compile a :class:`~lpbq_tvm.quantsim.QuantizationSimModel` for ``target``.

    ``mode="weight-only"`` lowers every LPBQ layer to a 4-bit packed-weight kernel (fp32
    activations); ``mode="fp32"`` compiles the unquantized model, for comparisons. Weights are
    encoded first if ``sim.compute_encodings`` has not run.
    """
    from lpbq_tvm.passes.lower_lpbq import MODES, LowerLPBQ

    if mode == "fp32":
        return build(sim.float_module, target, sim.inputs, sim.outputs)
    if mode not in MODES:
        msg = f"unknown compile mode {mode!r}; known: {', '.join(MODES + ('fp32',))}"
        raise ValueError(msg)
    if not sim.has_encodings:
        sim.compute_encodings()
    return build(LowerLPBQ(mode)(sim.encoded_module), target, sim.inputs, sim.outputs)
