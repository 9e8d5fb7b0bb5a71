"""Math intrinsics TVM 0.27 cannot lower for LLVM, made lowerable; registered once, for every target.

All targets of :mod:`lpbq_tvm.targets` generate code through LLVM, where TVM lowers a few ``tirx``
math intrinsics only to a C library call on one float32 or float64 value (``sinhf``, ``atanf``, ...):

* ``tirx.sinh`` and ``tirx.cosh`` are nevertheless marked vectorizable, so once a schedule
  vectorizes an elementwise loop (:class:`~lpbq_tvm.kernels.schedule_rules.Elementwise` does)
  codegen stops at "unknown intrinsic tirx.sinh". Marked scalar here, the vectorizer calls the C
  library once per lane, as it does for ``asinh``; the values are the C library's, as in onnxruntime.
* on float16 those calls do not exist: the float16 intrinsic is computed in float32 and rounded
  back to float16 (the float32 result is within an ulp of float32; rounding it to float16 adds
  half a float16 ulp).
"""

from __future__ import annotations

import tvm
from tvm import tirx

__all__ = ["LIBM_INTRINSICS"]

# lowered for LLVM through TVM's "default" rule only: a C library call on float32 / float64
LIBM_INTRINSICS = (
    "tirx.sinh",
    "tirx.cosh",
    "tirx.asin",
    "tirx.acos",
    "tirx.atan",
    "tirx.asinh",
    "tirx.acosh",
    "tirx.atanh",
    "tirx.erf",
    "tirx.log1p",
)
_VECTORIZABLE_IN_NAME_ONLY = ("tirx.sinh", "tirx.cosh")


def _float16_in_float32(call: tvm.ir.expr.Call) -> tvm.ir.expr.Call | tirx.Cast:
    """A float16 ``call`` made in float32; any other ``call`` is left to TVM's own rule."""
    dtype = str(call.ty)
    if not dtype.startswith("float16"):
        return call
    wide = dtype.replace("float16", "float32")
    return tirx.Cast(dtype, tirx.call_intrin(wide, call.op, *[tirx.Cast(wide, arg) for arg in call.args]))


for _name in _VECTORIZABLE_IN_NAME_ONLY:
    tvm.ir.register_op_attr(_name, "TVectorizable", False, level=11)
for _name in LIBM_INTRINSICS:
    tirx.register_intrin_lowering(_name, target="llvm", f=_float16_in_float32, level=11)
