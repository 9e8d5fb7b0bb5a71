"""The compile modes, defined once: how an LPBQ layer's activations are represented and accumulated.

==============  ======================  ====================================================
mode            activations             arithmetic (docs/design.md §3)
==============  ======================  ====================================================
``weight-only``  fp32                   ``Σ x · float(q·k)`` in fp32
``w4a8``        uint8 per tensor        ``Σ (xq − zx) · (q·k)`` in int32, bit-exact
``w4a16``       uint16 per tensor       the same in int64, bit-exact
``fp32``        fp32                    the unquantized model, for comparisons
==============  ======================  ====================================================
"""

from __future__ import annotations

__all__ = ["FLOAT_MODE", "LPBQ_MODES", "MODES", "activation_bits", "is_integer"]

LPBQ_MODES: dict[str, int | None] = {"weight-only": None, "w4a8": 8, "w4a16": 16}  # mode -> activation bits
FLOAT_MODE = "fp32"
MODES = (FLOAT_MODE, *LPBQ_MODES)


def activation_bits(mode: str) -> int | None:
    """The activation bitwidth of an LPBQ mode (None: fp32 activations); ``ValueError`` names the modes."""
    if mode not in LPBQ_MODES:
        msg = f"unknown LPBQ lowering mode {mode!r}; known: {', '.join(LPBQ_MODES)}"
        raise ValueError(msg)
    return LPBQ_MODES[mode]


def is_integer(mode: str) -> bool:
    """Whether ``mode`` quantizes activations (and so needs their calibrated ranges)."""
    return LPBQ_MODES.get(mode) is not None
