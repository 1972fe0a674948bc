"""A preflight check's result row and the thresholds the checks share (see ops/preflight.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail"]
GIB, MIB = 1 << 30, 1 << 20
MAX_FILE_ROWS = 200  # per-file problem rows per folder; the rest are counted in one row


@dataclass(frozen=True)
class Check:
    check: str
    status: Status
    message: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


@dataclass(frozen=True)
class Thresholds:
    disk_warn_bytes: int = 2 * GIB
    disk_fail_bytes: int = 200 * MIB
    expiry_warn_days: int = 30


DEFAULT_THRESHOLDS = Thresholds()
