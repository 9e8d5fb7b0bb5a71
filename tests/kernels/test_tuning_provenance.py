"""Every tuning table of the kernel families names the benchmark, host and docs/performance.md section
behind it, and those exist: a choice measured on one CPU stays traceable to its numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lpbq_tvm.kernels.aarch64.dense import TUNING as AARCH64_TUNING
from lpbq_tvm.kernels.x86.tuning import TUNINGS, tuning

ROOT = Path(__file__).resolve().parents[2]
PERFORMANCE = (ROOT / "docs" / "performance.md").read_text()
HEADINGS = {line[3:].strip() for line in PERFORMANCE.splitlines() if line.startswith("## ")}
TABLES = {f"x86 {cpu or 'default'}": entry for cpu, entry in TUNINGS.items()} | {"aarch64": AARCH64_TUNING}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_tuning_cites_a_benchmark_that_exists_and_a_section_with_its_numbers(name):
    _, provenance = TABLES[name]
    assert provenance.record in HEADINGS, f"{name}: no '## {provenance.record}' in docs/performance.md"
    scripts = re.findall(r"benchmarks/\w+\.py", provenance.command)
    assert scripts and all((ROOT / script).is_file() for script in scripts), provenance.command
    assert provenance.host


def test_the_x86_table_is_looked_up_by_llvm_cpu_name():
    import tvm

    zen1 = tvm.target.Target({"kind": "llvm", "mcpu": "znver1"})
    other = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
    assert tuning(zen1) is TUNINGS["znver1"][0] and tuning(zen1).madd_min_rows == 16
    assert tuning(other) is TUNINGS[""][0] and tuning(other).madd_min_rows is None
