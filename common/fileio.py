"""Atomic file writes: a reader (or a process restarted after a crash) sees the old file or the
new one, never half of one. Every file the app writes for later reuse goes through here. Also the
one file hash the project uses (:func:`sha256_file`: checkpoints, kits)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def private_mkdir(path: Path) -> Path:
    """``path`` as a folder; every folder created on the way is 0700 (readable by the owner only).
    Folders that already exist keep their mode."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # made meanwhile by another process
            pass
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a sibling temporary file, make it 0600, then rename it over ``path``.

    The temporary name keeps ``path``'s suffix, so writers that append one (``np.savez``) do not.
    """
    path = Path(path)
    private_mkdir(path.parent)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.chmod(tmp, 0o600)  # private by default: models, caches and state are the owner's alone
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda p: np.savez(p, **arrays))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (multi-GB checkpoints stay out of memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
