"""HTP integer simulation: the Qualcomm HTP NPU's arithmetic for LPBQ layers, run on the host CPU.

What it models, per LPBQ layer (DESIGN.md §3, §5): the input activation quantized per tensor to
uint8 / uint16 with its calibrated encoding (round half to even, clamp); the int4 LPBQ weight
expanded to the int8 per-channel weight ``q · k``; integer accumulation (int32 / int64); the
float epilogue ``acc · sx · s[c] + bias``; and the output requantized to the layer's calibrated
output encoding (QDQ: ``clamp(round_half_even(y / sy) + zy)``, then dequantized for the next op).

What it does not model: the operators between LPBQ layers run in fp32 (the HTP runs them in
fixed point too), bias quantization to int32, the HTP's own rounding of its requantization
multipliers, and its speed. Compare output codes, not floats: within one LSB of onnxruntime's
run of the same model exported as QDQ ONNX.
"""

from __future__ import annotations

import tvm

from lpbq_tvm.targets import cpu

NAME = "htp-sim"
MODES = ("w4a8", "w4a16")
REQUANTIZE_OUTPUTS = True
LIBRARY_NAME = cpu.LIBRARY_NAME


def tvm_target() -> tvm.target.Target:
    return cpu.tvm_target()


def device() -> tvm.runtime.Device | None:
    return cpu.device()
