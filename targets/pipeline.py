"""The Relax pipeline every CPU target compiles with: TVM's CPU pipeline plus the project's rewrites and rules.

Before legalization (each a pass of :mod:`lpbq_tvm.passes`): a matmul of a one-hot encoding becomes
a row lookup (``OneHotMatMul``, exact); grouped-query attention multiplies by the shared KV heads
instead of repeated copies (``GroupedAttention``, the same products); float16 functions and sums
that lose precision in float16 arithmetic are computed in float32 (``WidenFloat16Math``); a sigmoid
becomes ``1 / (1 + exp(-x))`` (``SigmoidByExp``); a batch norm with constant statistics becomes one
scale and one shift (``AffineBatchNorm``), any other is decomposed (``DecomposeOpsForInference``),
and ``CanonicalizeBindings`` drops the tuple either leaves, which would stop ``FuseOps`` from fusing
a conv, its batch norm and its activation; tests, selections and copies of constants are folded in
numpy (``FoldConstantsInNumpy``: TVM's ``FoldConstant`` compiles each call it folds with LLVM), the
rest by ``FoldConstant``, and a division by a constant becomes a multiplication by its reciprocal
(``ReciprocalDivision``, within 3 · 2^-24 relative); a reshape is sunk below the elementwise ops
after it (``SinkReshape``), so a dense kernel's epilogue follows it directly; last, ``tanh`` /
``erf`` / ``exp`` / ``softmax`` take TVM's vectorisable polynomial forms (``FastMathTransform``:
within 4 ulp of 1.0 for tanh and erf, 2 ulp relative for exp, a contract the tests check; LLVM
would otherwise call libm once per element). It comes after ``SinkReshape`` because its forms are
PrimFunc calls, which a reshape cannot sink below: before it, a decoder's SwiGLU (or a BERT's GELU)
stayed a pass of its own after its matmul.

After ``FuseOps``, the ops fused behind a scheduled kernel get its int32 indices
(``NarrowFusedEpilogues``) so ``FuseTIR`` can merge them; then, with a MetaSchedule database, its
tuned schedules, and the schedule rules of :mod:`lpbq_tvm.kernels.schedule_rules` for the rest,
their register tiles sized to the target's :class:`~lpbq_tvm.kernels.schedule_rules.RegisterFile`.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight

from lpbq_tvm.kernels.schedule_rules import (
    Elementwise,
    Fallible,
    KernelEpilogue,
    LaneReduction,
    RegisterFile,
    RegisterTiled,
)
from lpbq_tvm.passes.affine_batch_norm import AffineBatchNorm
from lpbq_tvm.passes.fold_constants_in_numpy import FoldConstantsInNumpy
from lpbq_tvm.passes.grouped_attention import GroupedAttention
from lpbq_tvm.passes.narrow_fused_epilogues import NarrowFusedEpilogues
from lpbq_tvm.passes.one_hot_matmul import OneHotMatMul
from lpbq_tvm.passes.reciprocal_division import ReciprocalDivision
from lpbq_tvm.passes.sigmoid_by_exp import SigmoidByExp
from lpbq_tvm.passes.sink_reshape import SinkReshape
from lpbq_tvm.passes.widen_float16_math import WidenFloat16Math

__all__ = ["cpu_pipeline"]


def cpu_pipeline(target: tvm.target.Target, registers: RegisterFile, database=None) -> tvm.transform.Pass:
    """The pipeline of the module docstring for ``target``; with a MetaSchedule ``database`` (entered as
    a context around the build), its tuned schedules first, the rules for the rest."""
    from tvm.relax.backend.cpu_generic import pipeline

    @tvm.transform.module_pass(opt_level=0, name="LPBQCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = [
                *pipeline.library_dispatch_passes(target),
                OneHotMatMul(),
                GroupedAttention(),
                WidenFloat16Math(),
                SigmoidByExp(),
                AffineBatchNorm(),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                FoldConstantsInNumpy(),
                _unless_ill_formed(relax.transform.FoldConstant()),
                ReciprocalDivision(),
                SinkReshape(),
                relax.transform.FastMathTransform(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                NarrowFusedEpilogues(),
                relax.transform.FuseTIR(),
                *([relax.transform.MetaScheduleApplyDatabase()] if database is not None else []),
                dlight.ApplyDefaultSchedule(
                    KernelEpilogue(),
                    RegisterTiled(registers),
                    Elementwise(),
                    Fallible(LaneReduction()),
                    Fallible(dlight.cpu.Reduction()),
                ),
                *pipeline.dataflow_lower_passes(target),
                *pipeline.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _unless_ill_formed(inner: tvm.transform.Pass) -> tvm.transform.Pass:
    """``inner``, or no change where its result calls a function the module does not define: TVM's
    ``FoldConstant`` before legalization legalizes a ``dynamic_strided_slice`` (a Slice with run-time
    bounds) into a call of a ``shape_func`` it does not add to the module, which nothing can compile."""

    @tvm.transform.module_pass(opt_level=0, name=f"UnlessIllFormed{inner.info.name}")
    def _guarded(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        result = inner(mod)
        return mod if _calls_undefined_function(result) else result

    return _guarded


def _calls_undefined_function(mod: tvm.IRModule) -> bool:
    defined = set(mod.get_global_vars())
    undefined = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(
                func, lambda e: undefined.append(e) if isinstance(e, tvm.ir.GlobalVar) and e not in defined else None
            )
    return bool(undefined)
