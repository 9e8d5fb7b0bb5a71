"""Tools pip cannot install (Chromium, the aarch64 cross linker, the emulated aarch64 board).

A test that needs one and does not find it calls :func:`missing_tool`: it skips, naming the tool and
how to install it — except under ``CI``, where ``.ci/run`` installs them all, so the absence is a
failure rather than a reason to skip.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing_tool(reason: str) -> NoReturn:
    """Skip with ``reason`` (what is missing and how to install it); fail instead under ``CI``."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
