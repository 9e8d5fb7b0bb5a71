"""HTP integer simulation: the Qualcomm HTP NPU's arithmetic for a QNN export, run on the host CPU.

It compiles the graph the QNN export writes (:meth:`QuantizationSimModel.qdq_module`): the prepared
model with ``Q -> DQ`` after every activation tensor (or, with ``quantize_all_activations=False``,
after the LPBQ layers' inputs and outputs only), its calibrated uint8 / uint16 encodings imported as
Relax ``quantize`` / ``dequantize``. Per LPBQ layer (docs/design.md §3, §5): the input quantized per tensor
(round half to even, clamp; exact on an input the graph has quantized already); the int4 LPBQ
weight expanded to the int8 per-channel weight ``q · k``; integer accumulation (int32 / int64); the
float epilogue ``acc · sx · s[c] + bias``, a Gemm's product first requantized to its ``pre_bias``
encoding; and the output requantized to its encoding.

What it does not model: the operators between LPBQ layers compute in fp32 on dequantized values
(the HTP runs them in fixed point: its uint16 Softmax is up to 1 LSB low), bias quantization to
int32, the HTP's own rounding of its requantization multipliers, and its speed. Compare output
codes, not floats: within one LSB per requantization of onnxruntime's run of the same QDQ ONNX.
"""

from __future__ import annotations

from lpbq_tvm.modes import LPBQ_MODES, needs_calibration
from lpbq_tvm.targets.cpu import CPU

__all__ = ["HTPSim"]


class HTPSim(CPU):
    """The host CPU target, compiling the QNN export's graph with requantized LPBQ outputs."""

    name = "htp-sim"
    modes = tuple(mode for mode in LPBQ_MODES if needs_calibration(mode))  # the HTP: every activation, calibrated
    channels_last = False  # the graph of the QNN export, as exported
    requantize_outputs = True
    kernel_families = ()  # requantized layers take the generic kernels
