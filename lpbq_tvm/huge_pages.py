"""Host tensors in one arena of transparent huge pages: a model's weights and a decoder's KV caches.

A decode step streams every weight once, from memory. In 4 KiB pages every 4 KiB it reads costs a
page walk, and a core's memory read rate drops by about a third (``docs/performance.md``, "Weights
out of cache"); the 2 MiB pages of Linux's transparent huge pages remove those walks. TVM allocates each
tensor on its own (``posix_memalign``), too small and unaligned for a huge page, so the weights of a
compiled model (:func:`lpbq_tvm.compiler.compile`, :class:`lpbq_tvm.bundle.LoadedBundle`) and the
caches of :class:`lpbq_tvm.llm.Decoder` are placed in one anonymous mapping, 2 MiB aligned and
advised ``MADV_HUGEPAGE`` (honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always`` or ``madvise``; elsewhere the tensors simply live in ordinary pages) — from
``HUGE_PAGES_FROM`` bytes: smaller weights stay in cache anyway.

Each tensor is a zero-copy DLPack view of the mapping, 64-byte aligned, which it keeps alive.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import tvm

__all__ = ["huge_page_copies", "huge_page_zeros"]

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # bytes, as TVM aligns its own allocations
# Tensors totalling less stay where they are (copies) or in ordinary pages (zeros): weights that small
# stay in cache between runs, and a huge page's first touch can stall on memory compaction (a
# compile of a small model would pay it for nothing).
HUGE_PAGES_FROM = 16 << 20
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def huge_page_zeros(specs: Sequence[tuple[Sequence[int], str]]) -> list[tvm.runtime.Tensor]:
    """Zero-filled host tensors of the given (shape, dtype)s, together in one arena, of huge pages from
    ``HUGE_PAGES_FROM`` bytes."""
    sizes = [_nbytes(shape, dtype) for shape, dtype in specs]
    offsets = np.cumsum([0] + [-(-size // ALIGNMENT) * ALIGNMENT for size in sizes])
    total = int(offsets[-1])
    length = -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a huge-page boundary
    if hasattr(mmap, "MAP_ANONYMOUS"):
        region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP-eligible
        arena = np.frombuffer(region, np.uint8)
    else:  # (no anonymous mappings, e.g. Windows: numpy's own zeroed memory)
        region, arena = None, np.zeros(length, np.uint8)
    start = -arena.ctypes.data % HUGE_PAGE
    if region is not None and hasattr(mmap, "MADV_HUGEPAGE") and total >= HUGE_PAGES_FROM:
        region.madvise(mmap.MADV_HUGEPAGE, start, length - HUGE_PAGE)
    tensors = []
    for (shape, dtype), offset, size in zip(specs, offsets[:-1], sizes, strict=True):
        itemsize = tvm.runtime.DataType(dtype).itemsize
        words = arena[start + offset : start + offset + size].view(_UNSIGNED[itemsize])
        tensor = tvm.runtime.from_dlpack(words.reshape(tuple(shape)))
        tensors.append(tensor if str(tensor.dtype) == str(dtype) else tensor._create_view(tuple(shape), dtype))
    return tensors


def huge_page_copies(tensors: Sequence[tvm.runtime.Tensor]) -> list[tvm.runtime.Tensor]:
    """Copies of host ``tensors`` (same shapes, dtypes and values) in one huge-page arena. Tensors of
    sub-byte dtypes, or not on the host, are returned as they are, and all of them where they total
    less than ``HUGE_PAGES_FROM`` bytes."""
    movable = [i for i, t in enumerate(tensors) if _movable(t)]
    if sum(_nbytes(tensors[i].shape, str(tensors[i].dtype)) for i in movable) < HUGE_PAGES_FROM:
        return list(tensors)
    copies = huge_page_zeros([(tuple(tensors[i].shape), str(tensors[i].dtype)) for i in movable])
    out = list(tensors)
    for index, copy in zip(movable, copies, strict=True):
        copy.copyfrom(tensors[index])
        out[index] = copy
    return out


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * tvm.runtime.DataType(dtype).itemsize


def _movable(tensor: tvm.runtime.Tensor) -> bool:
    dtype = tvm.runtime.DataType(str(tensor.dtype))
    host = tensor.device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    return host and dtype.lanes == 1 and dtype.bits % 8 == 0 and dtype.itemsize in _UNSIGNED
