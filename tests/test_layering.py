"""Imports run one way: every import in the installed package (module-level or inside a function) is
read from its source, checked against the layer rules below, and the whole graph must be acyclic."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import lpbq_tvm

# Layers, lowest first, by module-name prefix; the most specific prefix decides.
LAYERS = {
    "core": [f"lpbq_tvm.{name}" for name in ("encoder", "scale_search", "packing", "calibration", "reference")]
    + [f"lpbq_tvm.{name}" for name in ("modes", "attrs", "io", "timing", "onnx_layers", "examples")],
    "kernels": ["lpbq_tvm.kernels"],
    "passes": ["lpbq_tvm.passes"],
    "targets": ["lpbq_tvm.targets"],
    "workflow": ["lpbq_tvm"],  # the public face and everything not listed: frontend, quantsim, compiler, exports...
    "cli": ["lpbq_tvm.cli", "lpbq_tvm.__main__"],
}
# What each layer may import besides itself and the layers listed.
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "passes": {"core", "kernels"},
    "targets": {"core", "kernels", "passes"},
    "workflow": {"core", "kernels", "passes", "targets"},
    "cli": {"core", "kernels", "passes", "targets", "workflow"},
}
# Kernels a pass may use: the seam and the generic family, never an ISA's kernels.
PASS_KERNELS = ("lpbq_tvm.kernels", "lpbq_tvm.kernels.interface", "lpbq_tvm.kernels.generic")
# The kernel families, one per instruction set.
FAMILIES = ("lpbq_tvm.kernels.x86", "lpbq_tvm.kernels.aarch64")
# Modules that must import without TVM (the reference arithmetic, and cheap file writing).
WITHOUT_TVM = [f"lpbq_tvm.{name}" for name in ("encoder", "scale_search", "packing", "calibration", "reference")] + [
    f"lpbq_tvm.{name}" for name in ("modes", "attrs", "io")
]


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (passes/ and targets/ are mapped into it)."""
    found = {}
    for package in ("lpbq_tvm", "lpbq_tvm.passes", "lpbq_tvm.targets", "lpbq_tvm.kernels", "lpbq_tvm.cli"):
        spec = importlib.util.find_spec(package)
        for directory in spec.submodule_search_locations:
            for path in Path(directory).rglob("*.py"):
                parts = path.relative_to(directory).with_suffix("").parts
                name = ".".join((package, *parts)).removesuffix(".__init__")
                found.setdefault(name, path)
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The modules a source file imports (the package's own absolutely, as it is written): a module of the
    package, or the top-level name of another."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module}"
            for alias in node.names:  # `from package import module` imports the module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {module if module.startswith("lpbq_tvm") else module.split(".")[0] for module in found}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


_PREFIXES = sorted(
    ((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes), key=lambda p: -len(p[0])
)


def _layer(module: str) -> str:
    return next(layer for prefix, layer in _PREFIXES if module == prefix or module.startswith(prefix + "."))


def test_the_package_is_found_whole():
    expected = {"lpbq_tvm.passes.lower_lpbq", "lpbq_tvm.targets.base", "lpbq_tvm.kernels.tiled.nibble", *FAMILIES}
    assert expected <= MODULES.keys()
    assert Path(lpbq_tvm.__file__).parent in {path.parent for path in MODULES.values()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    layer = _layer(module)
    wrong = sorted(
        imported
        for imported in GRAPH[module]
        if imported in MODULES and _layer(imported) != layer and _layer(imported) not in ALLOWED[layer]
    )
    assert not wrong, f"{module} ({layer}) imports {wrong}"
    if layer == "passes":
        kernels = sorted(m for m in GRAPH[module] if m.startswith("lpbq_tvm.kernels") and m not in PASS_KERNELS)
        assert not kernels, f"{module} imports an ISA's kernels: {kernels}"
    if module.startswith("lpbq_tvm.kernels."):  # a family uses the shared kernels, never another family's
        family = _family(module)
        others = sorted(m for m in GRAPH[module] if _family(m) not in (None, family))
        assert not others, f"{module} imports another kernel family: {others}"


def _family(module: str) -> str | None:
    """The kernel family (ISA) a module belongs to, None outside the families (the seam, the generic and
    the shared tiled kernels, the schedule rules)."""
    return next((f for f in FAMILIES if module == f or module.startswith(f + ".")), None)


@pytest.mark.parametrize("module", WITHOUT_TVM)
def test_reference_arithmetic_and_file_writing_import_no_tvm(module):
    assert not {"tvm", "tvm_ffi"} & GRAPH[module], module
    inside = {m for m in GRAPH[module] if m in MODULES}
    assert inside <= set(WITHOUT_TVM), f"{module} imports {sorted(inside - set(WITHOUT_TVM))}"


def test_no_import_cycle():
    """Depth-first search for a back edge among the package's own modules."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(m for m in GRAPH[module] if m in MODULES and m != module):
            if state.get(imported) == "open":
                cycle = path[path.index(imported) :] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
