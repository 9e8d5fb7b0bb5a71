"""What the CPU kernel families share: the 64-channel tiled weight layout and the integer kernels built on it.

:mod:`.repack` turns the canonical packed storage into 64-channel tiles once, at conversion time;
:mod:`.decode` holds the expressions that read them; :mod:`.integer` builds a W4A8 / W4A16 kernel
(activation codes, byte planes, the exact accumulator, the epilogue) around a uint8 *scheme* — here
:mod:`.nibble`, the families add their own — with the family's dot-product instructions
(:class:`.integer.DotInstructions`); :mod:`.schedule` holds the schedule steps they share. Nothing
here names an instruction set: the families (:mod:`lpbq_tvm.kernels.x86`,
:mod:`lpbq_tvm.kernels.aarch64`) bring their intrinsics and tuning.
"""
