"""Interleaved timing: every candidate runs warm once per round, each round starting one further along."""

from __future__ import annotations

from lpbq_tvm.bench import time_interleaved


def test_candidates_take_turns_and_rotate_the_order():
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(functions, repeat=4)
    rounds = [calls[i : i + 6 : 2] for i in range(0, len(calls), 6)]
    assert calls[::2] == calls[1::2]  # each timed call follows an untimed warm-up of the same function
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(timings) == set("abc")
    assert all(0 <= t.min_ms <= t.median_ms <= t.max_ms for t in timings.values())
