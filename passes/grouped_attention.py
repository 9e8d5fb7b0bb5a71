"""GroupedAttention: grouped-query attention multiplies by the shared KV heads instead of repeated copies.

Match: ``matmul(a, kv_repeated)`` or ``matmul(a, permute_dims(kv_repeated, [0, 1, 3, 2]))`` where
``kv_repeated = reshape(broadcast_to(expand_dims(kv, 2), [b, g, r, T, d]), [b, g · r, T, d])``: how
exports of Llama-style models write ``repeat_kv`` (each of the ``g`` KV heads serves ``r`` query heads,
head ``h`` reading KV head ``h // r``), and ``a`` ``[b, g · r, s, x]`` static. Rewrite:
``reshape(matmul(reshape(a, [b, g, r · s, x]), kv or its transpose), [b, g · r, s, y])``.

The same products and sums: query head ``g_i · r + j`` row ``i`` becomes row ``j · s + i`` of group
``g_i``, multiplied by the same KV head. A transpose of keys that are themselves a transpose (the key
cache :class:`~lpbq_tvm.passes.kv_cache_in_place.KVCacheInPlace` holds transposed) cancels, repeated
heads or not: the matmul reads the cache as it lies. It stops materializing the repeated keys and values, a copy
of ``r`` times the whole cache per layer per decode step, which grows with the context. Run it before
legalization.
"""

from __future__ import annotations

import tvm
from tvm import relax

from lpbq_tvm.passes._layers import map_relax_functions

__all__ = ["GroupedAttention"]

_OPS = {
    name: tvm.ir.Op.get(f"relax.{name}")
    for name in ("matmul", "reshape", "broadcast_to", "expand_dims", "permute_dims")
}


@tvm.transform.module_pass(opt_level=0, name="GroupedAttention")
class GroupedAttention:
    """``matmul`` by repeated KV heads -> a grouped ``matmul`` by the KV heads; see the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def rewrite(func: relax.Function) -> relax.Function:
            rewriter = _Rewriter()
            rewritten = rewriter.visit_expr(func)
            return relax.analysis.remove_all_unused(rewritten) if rewriter.replaced else func

        return map_relax_functions(mod, rewrite)


def _static(expr: relax.Expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    replaced = False

    def _call(self, expr: relax.Expr, name: str) -> relax.Call | None:
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        return expr if isinstance(expr, relax.Call) and expr.op.same_as(_OPS[name]) else None

    def _shared_heads(self, expr: relax.Expr) -> tuple[relax.Expr, int] | None:
        """``(kv, r)`` when ``expr`` is ``kv [b, g, T, d]`` with each head repeated ``r`` times in place."""
        reshape = self._call(expr, "reshape")
        broadcast = None if reshape is None else self._call(reshape.args[0], "broadcast_to")
        expand = None if broadcast is None else self._call(broadcast.args[0], "expand_dims")
        if expand is None or [int(a) for a in expand.attrs.axis] != [2]:
            return None
        kv, wide, out = expand.args[0], _static(broadcast), _static(reshape)
        shape = _static(kv)
        if None in (shape, wide, out) or len(shape) != 4 or len(wide) != 5:
            return None
        b, g, t, d = shape
        r = wide[2]
        if wide != [b, g, r, t, d] or out != [b, g * r, t, d]:
            return None
        return kv, r

    def _swapped(self, expr: relax.Expr) -> relax.Call | None:
        """``expr`` as ``permute_dims(x, [0, 1, 3, 2])`` (its last two axes swapped), or None."""
        call = self._call(expr, "permute_dims")
        return call if call is not None and [int(x) for x in call.attrs.axes] == [0, 1, 3, 2] else None

    def _transpose(self, kv: relax.Expr) -> relax.Expr:
        """``kv`` with its last two axes swapped: the input of a swap it already is, else a new one."""
        inner = self._swapped(kv)
        return inner.args[0] if inner is not None else relax.op.permute_dims(kv, [0, 1, 3, 2])

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(_OPS["matmul"]):
            return call
        a, rhs = call.args
        transposed = self._swapped(rhs)
        twice = None if transposed is None else self._swapped(transposed.args[0])
        if twice is not None:  # keys that were transposed (a transposed key cache), not repeated
            self.replaced = True
            return relax.op.matmul(a, twice.args[0], out_dtype=call.attrs.out_dtype)
        found = self._shared_heads(rhs if transposed is None else transposed.args[0])
        a_shape, out_shape = _static(a), _static(call)
        if found is None or a_shape is None or out_shape is None or len(a_shape) != 4:
            return call
        kv, r = found
        b, heads, s, x = a_shape
        g = heads // r
        grouped_a = relax.op.reshape(a, [b, g, r * s, x])
        grouped_kv = self._transpose(kv) if transposed is not None else kv
        product = relax.op.matmul(grouped_a, grouped_kv, out_dtype=call.attrs.out_dtype)
        self.replaced = True
        return relax.op.reshape(product, out_shape)
