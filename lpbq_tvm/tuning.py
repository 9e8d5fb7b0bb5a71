"""Optional MetaSchedule tuning of a model's kernels into a database that later compiles reuse.

``tune(sim, work_dir, mode=..., trials=...)`` lowers the model as :func:`lpbq_tvm.compile` would,
extracts its kernels (the PrimFuncs after legalization and fusion; the hand-scheduled x86 LPBQ
kernels are left as they are) and measures candidate schedules, locally or on the devices of a
TVM RPC tracker (``rpc=("host:port", key)``: several servers under one key measure in parallel).
The records go to ``work_dir`` (MetaSchedule's JSON database); ``lpbq_tvm.compile(...,
tuning_db=work_dir)`` applies them and schedules everything else with the default rules.
MetaSchedule's XGBoost cost model guides the search when ``xgboost`` is installed (the ``tune``
extra); without it candidates are drawn at random. Tuning is never needed for correct results.
In the integer modes the LPBQ kernels are not tuned: a tuned schedule may fuse their fp32
epilogue into one FMA, which the bit-exact reference forbids.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

__all__ = ["TuningResult", "tune"]


@dataclass(frozen=True)
class TuningResult:
    work_dir: Path
    tasks: tuple[str, ...]  # the kernels tuned
    skipped: tuple[str, ...]  # kernels left to their own schedules
    records: int  # tuning records in the database


def tune(
    sim,
    work_dir: str | PathLike,
    *,
    target: str = "cpu",
    mode: str = "weight-only",
    trials: int = 64,
    rpc: tuple[str, str] | None = None,
    timeout: float = 60.0,
) -> TuningResult:
    """Tune the kernels of ``sim`` compiled for ``target`` in ``mode`` with ``trials`` measurements in all."""
    from tvm.relax.frontend import detach_params
    from tvm.s_tir import meta_schedule as ms

    from lpbq_tvm.compiler import lower
    from lpbq_tvm.targets import get_target

    if trials < 1:
        raise ValueError(f"trials must be positive, got {trials}")
    detached, _ = detach_params(lower(sim, target, mode))
    tvm_target = get_target(target).tvm_target()
    tasks = ms.relax_integration.extract_tasks(detached, tvm_target)

    def tunable(task) -> bool:
        scheduled = any(func.attrs and func.attrs.get("tirx.is_scheduled") for func in _prim_funcs(task.dispatched[0]))
        return not scheduled and not (mode != "weight-only" and "lpbq" in task.task_name)

    selected = [task for task in tasks if tunable(task)]
    if not selected:
        raise ValueError(f"nothing to tune in {mode} for {target}: every kernel is hand-scheduled")
    runner = "local"
    if rpc is not None:
        from lpbq_tvm.remote import parse_address

        host, port = parse_address(rpc[0])
        config = ms.runner.RPCConfig(host, port, rpc[1], session_timeout_sec=int(timeout))
        runner = ms.runner.RPCRunner(rpc_config=config, max_workers=_servers(rpc[0], rpc[1]))
    builder = ms.builder.LocalBuilder(f_build=_build)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=selected, work_dir=str(work_dir)
    )
    database = ms.relax_integration.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work_dir),
        max_trials_global=trials,
        num_trials_per_iter=min(trials, 64),
        builder=builder,
        runner=runner,
        cost_model="xgb" if importlib.util.find_spec("xgboost") else "random",
    )
    return TuningResult(
        Path(work_dir),
        tuple(task.task_name for task in selected),
        tuple(task.task_name for task in tasks if task not in selected),
        len(database.get_all_tuning_records()),
    )


def _build(mod, target, _params):
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin``: that import registers
    every bundled tensor intrinsic (CUDA, ROCm, Hexagon, ...) and takes about 50 s per builder worker
    on a 2-core machine, past the 30 s build timeout, while a candidate arrives already scheduled
    (tensorized where its trace says so) and needs none of them."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _prim_funcs(mod):
    from tvm import tirx

    return [func for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)]


def _servers(tracker: str, key: str) -> int:
    """How many servers the tracker lists under ``key`` (at least 1): one measuring worker each."""
    from tvm import rpc

    from lpbq_tvm.remote import parse_address

    host, port = parse_address(tracker)
    summary = rpc.connect_tracker(host, port).summary()
    queue = summary.get("queue_info", {}).get(key, {})
    return max(1, int(queue.get("free", 0)) + int(queue.get("pending", 0)))
