"""KVCacheInPlace: a decode step's ``concat(past, new)`` becomes a write into a preallocated KV cache.

Match: in ``main``, a model input ``past`` ``[b, h, P, d]`` (one of ``names``) whose only use is
``concat((past, new), axis=2)`` with ``new`` ``[b, h, 1, d]``: how exported decoders append a step's
key or value to the cache (``present = concat(past, new)``). Rewrite: the input becomes the cache
itself, ``[b, h, P + 1, d]`` under the same name, and the concat a ``call_tir_inplace`` that writes
``new`` into slot ``cache_slot[0]`` of it (``cache_slot``: an int64 ``[1]`` input appended to the
model inputs) and stands for the concat's result. The caller owns the caches and passes them to
every step; each step writes its one position into them (``b · h · d`` values per cache) instead of
copying the whole past into a new tensor.

What it relies on: softmax attention over the cache does not depend on the order of its slots, once
each key carries its rotary phase (applied before caching, from ``position_ids``) and the attention
mask marks the live slots; with one new position the causal mask lets it see every slot. So the
caller passes ``attention_mask`` over the cache's slots (1 for the slots written so far, this step's
included) and ``position_ids`` of the token's position, not of its slot. Run it on a graph of one
new position, before legalization; the output ``present`` of the exported graph is then the cache.

A cache named in ``transposed`` is held as ``[b, h, d, P + 1]``: each step writes its key as a column,
and the concat stands for ``permute_dims(cache, [0, 1, 3, 2])``. Attention multiplies by the keys'
transpose, so with :class:`~lpbq_tvm.passes.grouped_attention.GroupedAttention` cancelling the two
transposes the step reads the key cache as it lies instead of copying all of it, transposed, every
step (docs/llm.md says what that cost). Its ``present`` output is then that
transpose: a caller that owns the caches drops the outputs (the step's logits are what it needs).
"""

from __future__ import annotations

from collections.abc import Collection

import tvm
from tvm import relax
from tvm.script import tirx as T

from lpbq_tvm.attrs import num_inputs

__all__ = ["SLOT_INPUT", "KVCacheInPlace"]

SLOT_INPUT = "cache_slot"
_CONCAT = tvm.ir.Op.get("relax.concat")


@tvm.transform.module_pass(opt_level=0, name="KVCacheInPlace")
class KVCacheInPlace:
    """``concat((past, new), axis=2)`` of each cache input in ``names`` -> an in-place write (module docstring)."""

    def __init__(self, names: Collection[str], transposed: Collection[str] = ()) -> None:
        self.names = frozenset(names)
        self.transposed = frozenset(transposed)
        if not self.transposed <= self.names:
            raise ValueError(f"transposed caches {', '.join(sorted(self.transposed - self.names))} are not in names")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        caches = _cache_inputs(main, self.names, self.transposed)
        slot = relax.Var(SLOT_INPUT, relax.TensorType((1,), "int64"))
        rewriter = _Rewriter(mod, caches, slot, self.transposed)
        body = rewriter.visit_expr(main.body)
        free = relax.analysis.free_vars(body)
        left = sorted(
            past.name
            for past in caches
            if past.name not in rewriter.rewritten or any(var.same_as(past) for var in free)
        )
        if left:
            msg = f"KVCacheInPlace: {', '.join(left)} not used exactly once, as concat((past, new), axis=2)"
            raise ValueError(msg)
        count = num_inputs(main)
        params = [caches.get(p, p) for p in main.params]
        params = [*params[:count], slot, *params[count:]]
        func = relax.Function(params, body, main.ret_ty, main.is_pure, main.attrs).with_attr("num_input", count + 1)
        out = rewriter.builder_.get()
        out.update_func(out.get_global_var("main"), func)
        return out


def _cache_inputs(
    main: relax.Function, names: frozenset[str], transposed: frozenset[str]
) -> dict[relax.Var, relax.Var]:
    """Each input named in ``names`` -> its cache variable, one slot longer on axis 2 (its last two axes
    swapped if ``transposed``); a name that is not a 4-D model input of ``main`` is an error naming the inputs."""
    inputs = {p.name: p for p in main.params[: num_inputs(main)] if getattr(p.ty, "ndim", None) == 4}
    unknown = sorted(names - inputs.keys())
    if unknown:
        raise ValueError(f"no 4-D model input {', '.join(unknown)}; the inputs: {', '.join(inputs)}")
    caches = {}
    for name in sorted(names):
        past = inputs[name]
        b, h, p, d = past.ty.shape
        shape = (b, h, d, p + 1) if name in transposed else (b, h, p + 1, d)
        caches[past] = relax.Var(name, relax.TensorType(shape, past.ty.dtype))
    return caches


def _slot_write(shape, dtype: str, transposed: bool) -> tvm.tirx.PrimFunc:
    """``cache[:, :, slot[0], :] = new[:, :, 0, :]`` in place for a cache of static ``shape``; a transposed cache
    (``[b, h, d, slots]``) takes ``new`` as column ``slot[0]``."""
    shape = tuple(int(dim) for dim in shape)
    b, h = shape[:2]
    d, c = (shape[2], shape[3]) if transposed else (shape[3], shape[2])

    @T.prim_func(private=True, s_tir=True)
    def write(cache: T.Buffer(shape, dtype), new: T.Buffer((b, h, 1, d), dtype), slot: T.Buffer((1,), "int64")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque: FuseTIR cannot fuse in-place calls
        for i, j, k in T.grid(b, h, d):
            with T.sblock("write"):
                vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                T.reads(new[vi, vj, 0, vk], slot[0])
                if transposed:  # (a Python bool: the parser keeps one branch)
                    T.writes(cache[vi, vj, vk, 0:c])
                    cache[vi, vj, vk, slot[0]] = new[vi, vj, 0, vk]
                else:
                    T.writes(cache[vi, vj, 0:c, vk])
                    cache[vi, vj, slot[0], vk] = new[vi, vj, 0, vk]

    return write


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, caches: dict[relax.Var, relax.Var], slot: relax.Var, transposed: frozenset[str]
    ) -> None:
        super().__init__(mod)
        self.replacement = caches
        self.slot = slot
        self.transposed = transposed
        self.rewritten: set[str] = set()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not call.op.same_as(_CONCAT) or not isinstance(call.args[0], relax.Tuple):
            return super().visit_call_(call)
        fields = list(call.args[0].fields)
        past = fields[0]
        if past not in self.replacement or len(fields) != 2 or int(call.attrs.axis) % 4 != 2:
            return super().visit_call_(call)
        new = self.visit_expr(fields[1])
        if int(new.ty.shape[2]) != 1:
            steps = int(new.ty.shape[2])
            msg = f"KVCacheInPlace: the concat of '{past.name}' appends {steps} positions; a decode step appends 1"
            raise ValueError(msg)
        cache = self.replacement[past]
        symbol = "kv_cache_write_" + "".join(c if c.isalnum() else "_" for c in past.name)
        transposed = past.name in self.transposed
        write = self.builder_.add_func(_slot_write(cache.ty.shape, str(cache.ty.dtype), transposed), symbol)
        self.rewritten.add(past.name)
        written = relax.call_tir_inplace(write, (cache, new, self.slot), [0], cache.ty)
        return relax.op.permute_dims(written, [0, 1, 3, 2]) if transposed else written
