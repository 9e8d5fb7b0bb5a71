"""Shared fixtures: the golden reference vectors of ``tests/data/golden`` (docs/design.md §2); slow tests first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# LPBQ_GOLDEN_DIR points the tests at another set of vectors (e.g. freshly computed with aimet_onnx).
GOLDEN_DIR = Path(os.environ.get("LPBQ_GOLDEN_DIR", Path(__file__).resolve().parent / "data" / "golden"))


def golden_cases() -> list[str]:
    """Case names; an empty or missing folder is an error, never zero silent tests."""
    cases = sorted(path.stem for path in GOLDEN_DIR.glob("*.json"))
    if not cases:
        msg = f"no golden vectors in {GOLDEN_DIR} (LPBQ_GOLDEN_DIR overrides tests/data/golden)"
        raise FileNotFoundError(msg)
    return cases


@pytest.fixture(scope="session")
def load_golden():
    def load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
        meta = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
        with np.load(GOLDEN_DIR / f"{name}.npz") as arrays:
            return meta, dict(arrays)

    return load


@pytest.fixture(scope="session")
def arm64_device():
    """tools/arm64_device.sh, once its emulated aarch64 board is installed (tests/arm64_device.py)."""
    from arm64_device import SCRIPT, require_device

    require_device()
    return SCRIPT


@pytest.fixture(scope="session")
def arm64_tracker(arm64_device):
    """The emulated aarch64 boards of tests/arm64_device.py behind a tracker on 127.0.0.1: its address.
    Tests that use it carry ``pytest.mark.xdist_group("arm64-device")``, so one worker starts them."""
    from arm64_device import emulated_devices

    with emulated_devices() as address:
        yield address


@pytest.fixture
def arm64_session(arm64_tracker, tmp_path):
    """A session on the ``arm64`` board for one test (tests/arm64_device.py's ``Session``): a server serves
    one session at a time, and the tests that go through ``lpbq-tvm run --rpc`` ask the tracker for it too."""
    from arm64_device import Session

    with Session(arm64_tracker, "arm64", tmp_path) as session:
        yield session


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test asking for ``golden_case`` runs once per golden vector."""
    if "golden_case" in metafunc.fixturenames:
        metafunc.parametrize("golden_case", golden_cases())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests run first (otherwise in collection order): under ``pytest -n auto`` the workers then
    finish together, rather than one starting the slowest test when the others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
