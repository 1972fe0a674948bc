"""Process-level runtime settings: device choice and thread limits.

With 2 CPU cores, torch's default thread pool in every Flower process (ServerApp, each ClientApp,
each Ray actor) oversubscribes the machine and slows a training step by 40x, so every entry point
sets its thread count explicitly.
"""

from __future__ import annotations

import logging
import os
import sys

import torch


def configure_threads(num_threads: int) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def resolve_device(choice: str) -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if choice in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA device is visible")
    return torch.device(choice)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("flwr", "torch", "monai", "numpy", "dsfedmed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def setup_logging(logger: logging.Logger) -> None:
    """Our progress lines go to stdout, which Flower streams (``flwr run --stream``)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
