"""The installed layout: passes/ and targets/ ship as lpbq_tvm.passes / lpbq_tvm.targets."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_passes_and_targets_into_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lpbq_tvm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lpbq_tvm/passes/__init__.py" in names
    assert "lpbq_tvm/targets/__init__.py" in names
    assert "lpbq_tvm/encoder.py" in names
    assert "lpbq_tvm/exports/qnn_onnx.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert "passes" not in top_level and "targets" not in top_level
    assert not any(name.startswith("tests/") for name in names)


def test_subpackages_import_from_the_installed_package():
    import lpbq_tvm.passes
    import lpbq_tvm.targets

    assert Path(lpbq_tvm.passes.__file__).parent == ROOT / "passes"
    assert Path(lpbq_tvm.targets.__file__).parent == ROOT / "targets"


def test_encoder_and_packing_do_not_import_tvm():
    code = "import sys, lpbq_tvm.encoder, lpbq_tvm.packing; print('tvm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "False"
