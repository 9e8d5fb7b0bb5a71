"""ChannelsLast: run a model's 2-D convolutions, and what lies between them, in NHWC.

Match: every ``nn.conv2d`` in NCHW. Rewrite: TVM's ``ConvertLayout`` to NHWC data with HWIO
kernels (``permute_dims`` of the OIHW weight), which carries the layout through the elementwise
and normalisation ops in between, so that only the model's inputs and outputs are transposed. A
weight parameter with a value (the ``"params"`` attribute) is then stored in HWIO itself, so no
weight is transposed at run time; weights with an LPBQ encoding stay as they are, for LowerLPBQ
to match and replace.
Channels-last is what the CPU kernels want: LPBQ 1x1 convs become dense layers over the pixels
without transposes, im2col columns copy whole channel vectors, depthwise convs and batch norms
vectorise over channels. TVM 0.27 has no layout rule for ``clip`` (ONNX's Clip, HardSwish), which
would send every activation back to NCHW between convs; the pass registers the unary elementwise
rule for it.

The pass applies only where it is sound, and otherwise returns the module unchanged,
channels-first, with the reason logged (the LPBQ kernels handle both layouts):

* a module without a 2-D conv is left alone (TVM's ConvertLayout has nothing to gain there, and
  its 0.27 rules crash the process on some rank-0 ops), and so is one with a float16 (or other
  non-float32) conv: the kernels that want NHWC are float32, and 0.27 types a converted float16
  conv that feeds a batch norm as float32, which then fails to compile;
* ``conv2d_transpose`` stays NCHW / IOHW (TVM 0.27 lowers no other layout of it), and ops whose
  0.27 layout rule is wrong run in their original layout (``layer_norm``: the rule moves the
  normalized axes but not gamma and beta, wrong for a norm over more than one axis; ``stack``: on
  rank-0 inputs, as ONNX's Max / Min of scalars imports, it fails, or after a ``broadcast_to``
  divides by zero and kills the process);
* where ConvertLayout fails (its 0.27 rules for squeeze and friends reject some conv outputs, e.g.
  magika's), or leaves an op in a layout ``LegalizeOps`` cannot lower, the rewrite is not applied.

Run it before LowerLPBQ (which lowers NHWC LPBQ convs) and after EncodeLPBQ (which keys weights by
the parameters the convs read, as imported).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.attrs import ENCODINGS_ATTR, PARAMS_ATTR, function_attr, num_inputs
from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["ChannelsLast"]

_LAYOUT_RULE = "FRelaxInferLayout"
_DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
# TVM 0.27's layout rules that give wrong numbers or crash: not used
_WRONG_LAYOUT_RULES = ("relax.nn.layer_norm", "relax.stack")
_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_log = logging.getLogger(__name__)


def _register_clip_layout_rule() -> None:
    clip = tvm.ir.Op.get("relax.clip")
    if clip.get_attr(_LAYOUT_RULE) is None:  # clip(x, min, max) keeps x's layout, as abs(x) does
        tvm.ir.register_op_attr("relax.clip", _LAYOUT_RULE, tvm.ir.Op.get("relax.abs").get_attr(_LAYOUT_RULE))


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """NCHW 2-D convolutions and the ops between them to NHWC; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not _calls(mod, _CONV2D) or _convs_of_other_dtypes(mod):
            return mod
        _register_clip_layout_rule()
        try:
            with _without_layout_rules(_WRONG_LAYOUT_RULES):
                converted = relax.transform.ConvertLayout(_DESIRED_LAYOUTS)(mod)
            unlowered = _unlowered_ops(converted)
            unlowered = unlowered and unlowered - _unlowered_ops(mod)  # (legalizing twice only when needed)
        except tvm.error.InternalError as error:  # e.g. 0.27's squeeze rule on a conv output of rank 3
            reason = str(error).strip().splitlines()[-1]
            _log.info("ChannelsLast: TVM's ConvertLayout failed (%s); the convs stay channels-first", reason[:200])
            return mod
        if unlowered:
            ops = ", ".join(sorted(unlowered))
            _log.info("ChannelsLast: %s would stay in a layout TVM cannot lower; the convs stay channels-first", ops)
            return mod
        return relax.transform.CanonicalizeBindings()(map_relax_functions(converted, _store_permuted_weights))


def _calls(mod: tvm.IRModule, op: tvm.ir.Op | None = None) -> set[str]:
    """The operators the Relax functions of ``mod`` call (only ``op``, where given), by name."""
    found: set[str] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and (op is None or expr.op.same_as(op)):
            found.add(expr.op.name)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _convs_of_other_dtypes(mod: tvm.IRModule) -> bool:
    """Whether a 2-D conv of ``mod`` computes in another dtype than float32."""
    dtypes: set[str] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(_CONV2D):
            dtypes.add(str(expr.args[0].ty.dtype))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(dtypes - {"float32"})


def _unlowered_ops(mod: tvm.IRModule) -> set[str]:
    """The operators ``LegalizeOps`` leaves in ``mod``: those it cannot lower (in the layout they are in).
    (Not ``call_tir``, which is what it lowers to.)"""
    return _calls(relax.transform.LegalizeOps()(mod)) - {"relax.call_tir"}


@contextlib.contextmanager
def _without_layout_rules(ops: tuple[str, ...]):
    """Within the block, ``ops`` have no layout rule, so ConvertLayout keeps them in their original layout."""
    saved = {}
    for name in ops:
        op = tvm.ir.Op.get(name)
        if op.get_attr(_LAYOUT_RULE) is not None:
            saved[op] = op.get_attr(_LAYOUT_RULE)
            op.reset_attr(_LAYOUT_RULE)
    try:
        yield
    finally:
        for op, rule in saved.items():
            op.set_attr(_LAYOUT_RULE, rule)


def _store_permuted_weights(func: relax.Function) -> relax.Function:
    """Parameters read only through one ``permute_dims`` become parameters holding the permuted value."""
    if func.attrs is None or PARAMS_ATTR not in func.attrs:
        return func
    num_input = num_inputs(func)
    values = dict(zip(func.params[num_input:], func.attrs[PARAMS_ATTR], strict=True))
    encoded = set(function_attr(func, ENCODINGS_ATTR))
    reads: dict[relax.Var, list[relax.Expr]] = {}
    relax.analysis.post_order_visit(
        func.body,
        lambda e: (
            [reads.setdefault(a, []).append(e) for a in e.args if isinstance(a, relax.Var)]
            if isinstance(e, relax.Call)
            else None
        ),
    )
    permuted: dict[relax.Var, tuple[relax.Var, np.ndarray]] = {}
    for param, value in values.items():
        users = reads.get(param, [])
        if param.name in encoded or len(users) != 1 or getattr(users[0].op, "name", "") != "relax.permute_dims":
            continue
        axes = [int(a) for a in users[0].attrs.axes]
        array = np.ascontiguousarray(np.transpose(value.numpy(), axes))
        permuted[param] = (relax.Var(param.name, relax.TensorType(array.shape, str(array.dtype))), array)
    if not permuted:
        return func

    @relax.expr_functor.mutator
    class _Replace(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            if getattr(call.op, "name", "") == "relax.permute_dims" and call.args[0] in permuted:
                return permuted[call.args[0]][0]
            return super().visit_call_(call)

    body = _Replace().visit_expr(func.body)
    params = [permuted[p][0] if p in permuted else p for p in func.params]
    new_values = [tvm.runtime.tensor(permuted[p][1]) if p in permuted else v for p, v in values.items()]
    new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return new_func.with_attr(PARAMS_ATTR, new_values)
