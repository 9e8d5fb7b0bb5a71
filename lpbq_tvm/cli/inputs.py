"""The CLI's reading of user data: ``--input-shape`` specs and calibration ``.npz`` files."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["calibration_batches", "input_shapes", "sample_batches"]


def input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            msg = f"--input-shape {spec!r} is not NAME=D1,D2,... (e.g. x=1,3,224,224)"
            raise ValueError(msg) from None
        if not name or any(d <= 0 for d in shapes[name]):
            msg = f"--input-shape {spec!r} is not NAME=D1,D2,... with positive sizes"
            raise ValueError(msg)
    return shapes


def calibration_batches(path: str, sim) -> list[dict[str, np.ndarray]]:
    """Calibration batches from an .npz holding one array per model input (see --help)."""
    with np.load(path) as archive:
        arrays = dict(archive)
    names = [info.name for info in sim.inputs]
    if sorted(arrays) != sorted(names):
        msg = f"{path}: holds arrays {', '.join(sorted(arrays)) or '(none)'}; the model's inputs are {', '.join(names)}"
        raise ValueError(msg)
    batches = []
    for info in sim.inputs:
        array = arrays[info.name]
        if array.shape == info.shape:
            array = array[None]
        if array.shape[1:] != info.shape:
            msg = (
                f"{path}: '{info.name}' has shape {list(array.shape)}; expected [N, {', '.join(map(str, info.shape))}]"
            )
            raise ValueError(msg)
        batches.append(array.astype(info.dtype, copy=False))
    return [dict(zip(names, values, strict=True)) for values in zip(*batches, strict=True)]


def sample_batches(sim, batches, count: int = 2) -> list[dict[str, np.ndarray]]:
    """Calibration batches if given, else ``count`` seeded random batches."""
    return list(batches) if batches else [sim.random_inputs(seed) for seed in range(count)]
