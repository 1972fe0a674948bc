"""Preflight: the site model at the run's input size, the device, the pinned packages, disk space and
writable folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from common.config import NodeConfig
from ops.checks import DEFAULT_THRESHOLDS, GIB, MIB, Check, Thresholds

# --- model, device, packages, disk ------------------------------------------------------------


def check_model(name: str, image_size: int) -> Check:
    import torch

    from common.models import build_model, check_input_size, count_parameters

    try:
        check_input_size(name, image_size)
        torch.manual_seed(0)
        model = build_model(name).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
    except (KeyError, ValueError, RuntimeError) as exc:
        return Check("model", "fail", f"model {name!r} at {image_size}x{image_size}: {exc}")
    if tuple(out.shape) != (1, 1, image_size, image_size):
        return Check("model", "fail", f"model {name!r} returns {tuple(out.shape)} for a {image_size}px image")
    return Check(
        "model", "ok", f"{name} builds at {image_size}x{image_size}: {count_parameters(model):,} parameters"
    )


def check_device(choice: str) -> Check:
    import torch

    from common.runtime import resolve_device

    choice = choice or "auto"
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    seen = f"{len(gpus)} GPU(s): {', '.join(gpus)}" if gpus else "no CUDA device visible"
    try:
        dev = resolve_device(choice)
    except RuntimeError as exc:
        return Check("device", "fail", f"{exc} ({build}; check the driver and CUDA_VISIBLE_DEVICES)")
    return Check("device", "ok", f"device={choice} runs on {dev}; {seen} ({build})")


def pinned_requirements() -> list[Any]:
    """The ``dsfedmed`` distribution's own runtime requirements (extras excluded)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        lines = requires("dsfedmed") or []
    except PackageNotFoundError:
        return []
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def check_packages() -> list[Check]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = pinned_requirements()
    if not reqs:
        return [Check("packages", "warn", "the dsfedmed distribution is not installed: pins not checked")]
    rows, fine = [], []
    for req in reqs:
        try:
            have = version(req.name)
        except PackageNotFoundError:
            rows.append(Check("packages", "fail", f"{req.name} is not installed (dsfedmed needs {req})"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            rows.append(
                Check("packages", "warn", f"{req.name} {have} installed, dsfedmed pins {req.specifier}")
            )
        else:
            fine.append(f"{req.name} {have}")
    if fine:
        rows.insert(0, Check("packages", "ok", f"{len(fine)} of {len(reqs)} pinned: " + ", ".join(fine)))
    return rows


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(path: str | Path, what: str, limits: Thresholds = DEFAULT_THRESHOLDS) -> Check:
    where = _existing(Path(path))
    free = shutil.disk_usage(where).free
    msg = f"{free / GIB:.1f} GiB free at {where} ({what} {path})"
    if free < limits.disk_fail_bytes:
        return Check("disk", "fail", msg + f"; at least {limits.disk_fail_bytes / MIB:.0f} MiB needed")
    if free < limits.disk_warn_bytes:
        return Check("disk", "warn", msg + f"; under {limits.disk_warn_bytes / GIB:.1f} GiB")
    return Check("disk", "ok", msg)


def check_writable(path: str | Path, what: str) -> Check:
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return Check(what, "fail", f"{p} exists and is not a folder")
    where = _existing(p)
    if not os.access(where, os.W_OK | os.X_OK):
        return Check(what, "fail", f"{where} is not writable by this user (needed for {what} {p})")
    return Check(what, "ok", f"{p} " + ("is writable" if p.exists() else f"will be created (in {where})"))


def site_state_dir(node: NodeConfig) -> Path:
    """Where the site writes (NodeConfig: state-dir, else cache-dir/state, else the default cache)."""
    from common.data import default_cache_dir

    if node.state_dir:
        return Path(node.state_dir).expanduser()
    return (Path(node.cache_dir).expanduser() if node.cache_dir else default_cache_dir()) / "state"
