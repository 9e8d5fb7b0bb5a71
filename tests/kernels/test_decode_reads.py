"""The decoded int8 tile of the fold-k and matrix-multiply schemes reads each block's ``k`` once per lane
chunk (``tiled.schedule.decode_by_block``), not at every k-step of the block.

Counted in the scheduled TIR: the reads of the ``kw`` buffer, each weighted by the trip count of the
loops around it. The weights hold ``NT · ceil(nb / 2) · 64`` bytes of ``k``; two blocks share a byte,
so a decode that reads them once per block and lane chunk reads that twice. The decode before read
them for every k-step and half of it (64 times as often at B = 64), and LLVM could not hoist the reads:
the tile's stores might have changed them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import tvm
from tvm import tirx

from lpbq_tvm.kernels.aarch64.dense import integer_dense
from lpbq_tvm.kernels.x86.dense import w4a8_dense

X86 = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
I8MM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]})
DOTPROD = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})


def loads(expr, name: str) -> int:
    """Loads of buffer ``name`` in an expression."""
    if isinstance(expr, Sequence):
        return sum(loads(e, name) for e in expr)
    if not isinstance(expr, tvm.ir.expr.Expr):
        return 0
    own = isinstance(expr, tvm.ir.expr.TensorLoad) and str(expr.source.name) == name
    fields = ("a", "b", "value", "args", "condition", "true_value", "false_value", "indices", "vectors", "body")
    return own + sum(loads(getattr(expr, field), name) for field in fields if hasattr(expr, field))


def buffer_reads(stmt, name: str, trips: int = 1) -> int:
    """How many times the loop nest ``stmt`` reads buffer ``name``: each load times its loops' trip counts."""
    if isinstance(stmt, tirx.For):
        return buffer_reads(stmt.body, name, trips * int(stmt.extent))
    if isinstance(stmt, tirx.SeqStmt):
        return sum(buffer_reads(s, name, trips) for s in stmt.seq)
    if isinstance(stmt, tirx.BufferStore):
        return trips * loads([stmt.value, *stmt.indices], name)
    children = [getattr(stmt, field, None) for field in ("block", "body", "init", "then_case", "else_case")]
    return sum(buffer_reads(child, name, trips) for child in children if isinstance(child, tirx.Stmt))


CASES = {
    "x86 fold-k": lambda M, N, K, B: w4a8_dense(M, N, K, B, target=X86),
    "aarch64 fold-k": lambda M, N, K, B: integer_dense(M, N, K, B, 8, target=DOTPROD),
    "aarch64 usmmla": lambda M, N, K, B: integer_dense(M, N, K, B, 8, target=I8MM),
}


@pytest.mark.parametrize("B", [32, 64, 128])
@pytest.mark.parametrize("case", CASES)
def test_each_block_k_is_read_once_per_block(case, B):
    M, N, K = 32, 128, 512  # fold-k from 24 rows on x86 (Tuning.fold_k_min_rows), usmmla from 4 on i8mm
    function = CASES[case](M, N, K, B)
    tiles, blocks = N // 64, K // B
    stored = tiles * -(-blocks // 2) * 64  # kw's bytes
    assert buffer_reads(function.body, "kw") == 2 * stored
