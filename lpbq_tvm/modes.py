"""The compile modes, defined once: how an LPBQ layer's activations are represented and accumulated.

================  ========================  ====================================================
mode              activations               arithmetic (docs/design.md §3)
================  ========================  ====================================================
``weight-only``   fp32                      ``Σ x · float(q·k)`` in fp32
``w4a8``          uint8 per tensor          ``Σ (xq − zx) · (q·k)`` in int32, bit-exact
``w4a8-dynamic``  uint8 per row (token),    the same, each row's scale and zero point from its
                  encoded at run time       own range (no calibration), bit-exact
``w4a16``         uint16 per tensor         the same in int64, bit-exact
``fp32``          fp32                      the unquantized model, for comparisons
================  ========================  ====================================================

``w4a8``'s one calibrated range per tensor is what the Qualcomm HTP runs; a language model's
activations (rows and channels hundreds of times larger than the rest) need ``w4a8-dynamic`` on
a CPU, as onnxruntime's ``MatMulNBits`` at accuracy level 4 quantizes them per block at run time.
"""

from __future__ import annotations

__all__ = ["FLOAT_MODE", "LPBQ_MODES", "MODES", "activation_bits", "is_dynamic", "is_integer", "needs_calibration"]

# mode -> activation bits
LPBQ_MODES: dict[str, int | None] = {"weight-only": None, "w4a8": 8, "w4a8-dynamic": 8, "w4a16": 16}
DYNAMIC_MODES = frozenset({"w4a8-dynamic"})
FLOAT_MODE = "fp32"
MODES = (FLOAT_MODE, *LPBQ_MODES)


def activation_bits(mode: str) -> int | None:
    """The activation bitwidth of an LPBQ mode (None: fp32 activations); ``ValueError`` names the modes."""
    if mode not in LPBQ_MODES:
        msg = f"unknown LPBQ lowering mode {mode!r}; known: {', '.join(LPBQ_MODES)}"
        raise ValueError(msg)
    return LPBQ_MODES[mode]


def is_integer(mode: str) -> bool:
    """Whether ``mode`` quantizes activations."""
    return LPBQ_MODES.get(mode) is not None


def is_dynamic(mode: str) -> bool:
    """Whether ``mode`` computes its activation encodings at run time, per row."""
    return mode in DYNAMIC_MODES


def needs_calibration(mode: str) -> bool:
    """Whether ``mode`` quantizes activations with calibrated ranges."""
    return is_integer(mode) and not is_dynamic(mode)
