"""Hand-scheduled LPBQ dense kernels for aarch64 (NEON, and the Armv8.2 dot product for the integer modes).

Weight-only (:mod:`.dense`): the shared kernel of :mod:`lpbq_tvm.kernels.tiled.weight_only` as NEON
code. W4A8 and W4A16: below four rows the lane-pair scheme of :mod:`lpbq_tvm.kernels.tiled` (the
nibble scheme for a layer of one partial tile), its ``Σ xq · u`` per block computed by ``udot`` on
the weights as stored (:mod:`.intrinsics`); from four rows :mod:`.fold_k` (or :mod:`.mmla` with
i8mm), a tile's ``q·k`` decoded once; W4A16 as two byte planes. :func:`integer_weights` gives the
weights in the layout the chosen scheme reads.
Bit-exact with :mod:`lpbq_tvm.reference` (checked on the emulated board, ``tests/kernels/aarch64``).
Requantized outputs and integer layers on CPUs without ``dotprod`` take the generic kernels.

:func:`dense_kernel` is the family's entry for a target's kernel provider.
"""

from lpbq_tvm.kernels.aarch64.dense import dense_kernel, integer_dense, integer_weights, weight_only_dense

__all__ = ["dense_kernel", "integer_dense", "integer_weights", "weight_only_dense"]
