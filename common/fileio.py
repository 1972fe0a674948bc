"""Atomic file writes: a reader (or a process restarted after a crash) sees the old file or the
new one, never half of one. Every file the app writes for later reuse goes through here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a sibling temporary file, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that append one (``np.savez``) do not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda p: np.savez(p, **arrays))
