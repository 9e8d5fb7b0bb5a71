"""Hand-scheduled LPBQ dense kernels for x86-64: AVX-512 / VNNI, with AVX2 and plain-vector fallbacks.

Three kernels, each a scheduled ``tvm.tirx.PrimFunc`` (attr ``tirx.is_scheduled``) that
``relax.call_tir`` calls and ``tvm.compile`` builds as is: weight-only (:mod:`.weight_only`), W4A8
and W4A16 (:mod:`.integer`, with one module per scheme: :mod:`.nibble`, :mod:`.block_dot`,
:mod:`.fold_k`, :mod:`.madd`). They read the canonical packed storage repacked once, at
conversion time, into 64-channel tiles (:mod:`.repack`), decode it with the expressions of
:mod:`.decode` and the tensor intrinsics of :mod:`.intrinsics`, and share the schedule steps of
:mod:`.schedule`; the per-CPU choices measured rather than derived are one table, :mod:`.tuning`.

Every kernel is out-elementwise-fusable (``op_pattern = 4``, its output block marked
:data:`~lpbq_tvm.kernels.interface.FUSABLE_OUTPUT`): the batch norm and activation after a layer
fuse into its function and are computed as each output tile is written. The integer kernels keep
the reference's separate roundings behind an arithmetic fence (:func:`lpbq_tvm.kernels.generic.rounded`).

:func:`dense_kernel` is the family's entry for a target's kernel provider; :mod:`.dense` holds it
and the choice among the schemes.
"""

from lpbq_tvm.kernels.tiled.repack import repack_w4a8, repack_weight_only
from lpbq_tvm.kernels.x86.dense import dense_kernel, w4a8_dense, w4a16_dense, w4a16_scheme
from lpbq_tvm.kernels.x86.weight_only import weight_only_dense

__all__ = [
    "dense_kernel",
    "repack_w4a8",
    "repack_weight_only",
    "w4a8_dense",
    "w4a16_dense",
    "w4a16_scheme",
    "weight_only_dense",
]
