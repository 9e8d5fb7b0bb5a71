"""Interleaved timing: every candidate runs a warm burst per round, each round starting one further along."""

from __future__ import annotations

import lpbq_tvm.timing
from lpbq_tvm.timing import time_interleaved


def test_candidates_take_turns_and_rotate_the_order(monkeypatch):
    monkeypatch.setattr(lpbq_tvm.timing, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(lpbq_tvm.timing, "WARM_SECONDS", 0.0)  # one untimed call per burst
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(functions, repeat=8, burst=2)  # 4 rounds of 1 untimed + 2 timed calls each
    assert calls == [name for order in ("abc", "bca", "cab", "abc") for name in order for _ in range(3)]
    assert set(timings) == set("abc")
    assert all(0 <= t.min_ms <= t.median_ms <= t.max_ms for t in timings.values())


def test_host_cpu_names_the_model_flags_and_llvm_cpu():
    import json

    from tvm.target import codegen

    from lpbq_tvm.timing import host_cpu

    host = host_cpu()
    assert host["model"] and host["model"] != "unknown"
    assert host["flags"] and all(flag == flag.strip() and " " not in flag for flag in host["flags"])
    assert host["llvm_cpu"] == str(codegen.llvm_get_system_cpu()) and host["cores"] >= 1
    assert json.loads(json.dumps(host)) == host  # recorded beside benchmark rows as JSON
