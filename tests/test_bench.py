"""Interleaved timing: every candidate runs once per round, each round starting one further along."""

from __future__ import annotations

from lpbq_tvm.bench import time_interleaved


def test_candidates_take_turns_and_rotate_the_order():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(functions, repeat=4)
    warm_up, rounds = calls[:3], [calls[i : i + 3] for i in range(3, len(calls), 3)]
    assert warm_up == ["a", "b", "c"]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(timings) == set("abc")
    assert all(0 <= t.min_ms <= t.median_ms <= t.max_ms for t in timings.values())
