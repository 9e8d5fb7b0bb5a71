"""Tensors in one huge-page arena: values, dtypes, alignment and lifetime survive the move."""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest
import tvm

from lpbq_tvm import huge_pages
from lpbq_tvm.huge_pages import ALIGNMENT, HUGE_PAGE, huge_page_copies, huge_page_zeros


@pytest.fixture(autouse=True)
def huge_pages_for_any_size(monkeypatch):
    """The tests' tensors are small: move them all the same (the threshold has its own test)."""
    monkeypatch.setattr(huge_pages, "HUGE_PAGES_FROM", 0)


def _address(tensor: tvm.runtime.Tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


def test_copies_keep_every_value_shape_and_dtype():
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal((3, 5)).astype(np.float32),
        rng.integers(-(2**40), 2**40, 7, dtype=np.int64),
        rng.integers(0, 256, (2, 3, 4), dtype=np.uint8),
        np.array([True, False, True]),
        np.zeros((0, 4), np.float32),
        rng.standard_normal(9).astype(np.float16),
    ]
    originals = [tvm.runtime.tensor(v) for v in values]
    copies = huge_page_copies(originals)
    for value, original, copy in zip(values, originals, copies, strict=True):
        assert copy is not original
        assert (copy.shape, str(copy.dtype)) == (original.shape, str(original.dtype))
        np.testing.assert_array_equal(copy.numpy(), value)
    bf16 = tvm.runtime.tensor(np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16))
    (copy,) = huge_page_copies([bf16])
    assert str(copy.dtype) == "bfloat16"
    np.testing.assert_array_equal(copy.numpy().astype(np.float32), np.arange(6, dtype=np.float32))


def test_tensors_are_aligned_apart_and_in_one_huge_page_aligned_arena():
    tensors = huge_page_zeros([((3,), "uint8"), ((1000, 1000), "float32"), ((5, 7), "int32")])
    addresses = [_address(t) for t in tensors]
    assert all(a % ALIGNMENT == 0 for a in addresses)
    assert addresses[0] % HUGE_PAGE == 0  # the arena starts on a huge page
    assert addresses == sorted(addresses) and addresses[1] - addresses[0] == ALIGNMENT
    assert addresses[2] - addresses[1] >= 4_000_000
    assert all(not t.numpy().any() for t in tensors)


def test_writing_one_tensor_leaves_its_neighbours_alone():
    tensors = huge_page_zeros([((5,), "float32"), ((3,), "float32"), ((5,), "float32")])
    tensors[1].copyfrom(np.full(3, 7.0, np.float32))
    assert not tensors[0].numpy().any() and not tensors[2].numpy().any()
    np.testing.assert_array_equal(tensors[1].numpy(), [7.0, 7.0, 7.0])


def test_a_tensor_keeps_the_arena_alive():
    (tensor,) = huge_page_copies([tvm.runtime.tensor(np.arange(1000, dtype=np.float32))])
    gc.collect()
    big = [np.full(2**20, 3.0) for _ in range(8)]  # reuse of freed memory would show here
    np.testing.assert_array_equal(tensor.numpy(), np.arange(1000, dtype=np.float32))
    del big


@pytest.mark.parametrize("dtype", ["int4", "float32x4"])
def test_sub_byte_and_vector_dtypes_stay_where_they_are(dtype):
    original = tvm.runtime.empty((8,), dtype)
    assert huge_page_copies([original])[0].same_as(original)


def test_tensors_smaller_than_the_threshold_stay_where_they_are(monkeypatch):
    """Below ``HUGE_PAGES_FROM`` bytes in all, copies are the tensors themselves (a small model's compile
    pays no copy and no huge-page fault); from it on, copies."""
    tensors = [tvm.runtime.tensor(np.zeros(256, np.float32)), tvm.runtime.tensor(np.zeros(256, np.int32))]
    monkeypatch.setattr(huge_pages, "HUGE_PAGES_FROM", 2048 + 1)
    assert all(c.same_as(t) for c, t in zip(huge_page_copies(tensors), tensors, strict=True))
    monkeypatch.setattr(huge_pages, "HUGE_PAGES_FROM", 2048)
    assert not any(c.same_as(t) for c, t in zip(huge_page_copies(tensors), tensors, strict=True))
