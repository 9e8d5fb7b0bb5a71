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

Where TVM's ConvertLayout fails on a model (its 0.27 rules for squeeze and friends reject some
conv outputs, e.g. magika's), the module is returned unchanged, channels-first, and the reason
logged: the LPBQ kernels handle both layouts.

Run it before LowerLPBQ (which lowers NHWC LPBQ convs) and after EncodeLPBQ (which keys weights by
the parameters the convs read, as imported).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from lpbq_tvm.attrs import ENCODINGS_ATTR, PARAMS_ATTR, function_attr, num_inputs
from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["ChannelsLast"]

_LAYOUT_RULE = "FRelaxInferLayout"
_log = logging.getLogger(__name__)


def _register_clip_layout_rule() -> None:
    clip = tvm.ir.Op.get("relax.clip")
    if clip.get_attr(_LAYOUT_RULE) is None:  # clip(x, min, max) keeps x's layout, as abs(x) does
        tvm.ir.register_op_attr("relax.clip", _LAYOUT_RULE, tvm.ir.Op.get("relax.abs").get_attr(_LAYOUT_RULE))


@tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
class ChannelsLast:
    """NCHW 2-D convolutions and the ops between them to NHWC; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        _register_clip_layout_rule()
        try:
            converted = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
        except tvm.error.InternalError as error:  # e.g. 0.27's squeeze rule on a conv output of rank 3
            reason = str(error).strip().splitlines()[-1]
            _log.info("ChannelsLast: TVM's ConvertLayout failed (%s); the convs stay channels-first", reason)
            return mod
        return relax.transform.CanonicalizeBindings()(map_relax_functions(converted, _store_permuted_weights))


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
