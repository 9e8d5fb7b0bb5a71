"""The LPBQ kernels, by family, and the schedule rules for everything else on a CPU.

* :mod:`~lpbq_tvm.kernels.interface` — what a kernel family is asked (a :class:`DenseLayer`) and
  what it answers (a :class:`KernelChoice`), and the block annotations kernels and rules share;
* :mod:`~lpbq_tvm.kernels.generic` — tensor-expression kernels for every LPBQ layer on every
  target (dense, conv, grouped conv, requantized outputs), scheduled by the rules below;
* :mod:`~lpbq_tvm.kernels.x86` — hand-scheduled dense kernels for x86-64 (AVX-512 / VNNI, AVX2);
* :mod:`~lpbq_tvm.kernels.schedule_rules` — register-tiled and elementwise schedules that replace
  TVM's plain loop nests for the operators no hand kernel covers.

Kernels import no pass, target, CLI or workflow module: a target's kernel provider
(:mod:`lpbq_tvm.targets`) chooses among the families, and :class:`~lpbq_tvm.passes.lower_lpbq.LowerLPBQ`
calls what it is given.
"""
