"""Writing files safely: nothing overwritten unless asked, nothing written through a symlink, no partial output.

Every file the project writes goes through :func:`atomic_write` (a temporary file renamed into
place) or :func:`atomic_directory` (a temporary sibling directory renamed into place). Imports no
TVM, so writing a JSON file stays cheap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_write", "check_writable", "sha256"]

_OVERWRITE_HINT = "pass overwrite=True (CLI: --force)"


def check_writable(path: str | PathLike, overwrite: bool, hint: str = _OVERWRITE_HINT) -> Path:
    """``path`` if it may be written: not existing (or ``overwrite``), and not a symlink. No side effects."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; refusing to write through it")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; {hint} to replace it")
    return path


def _prepared(path: str | PathLike, overwrite: bool) -> Path:
    """:func:`check_writable`, then the parent folders created."""
    path = check_writable(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # a file where a folder of the path should be
        raise NotADirectoryError(f"cannot write {path}: {error.filename} is not a directory") from error
    return path


def atomic_write(path: str | PathLike, write: Callable[[str], Any], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` (a temporary file with ``path``'s suffix), then rename it to ``path``."""
    path = _prepared(path, overwrite)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_directory(path: str | PathLike, fill: Callable[[Path], Any], *, overwrite: bool = False) -> Path:
    """Fill a temporary sibling directory, then rename it to ``path``: a failure leaves nothing behind."""
    path = _prepared(path, overwrite)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        fill(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
