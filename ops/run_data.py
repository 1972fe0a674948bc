"""A federated run's directory read for reporting (``metrics.jsonl``, ``summary.json``, config,
pool score), and the number/bytes/seconds formatting the report's sections share."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ReportError(RuntimeError):
    """The run directory (or the site's data/model) cannot be used; the message names the file."""


# --- reading the run directory --------------------------------------------------------------------


@dataclass
class RunData:
    path: Path
    rows: list[dict]
    summary: dict
    run_config: dict
    profiles: dict
    pool_score: dict | None
    notes: list[str]


def _read_json_file(path: Path, required: bool) -> tuple[Any, str | None]:
    """(data, problem); a required file that is missing or corrupt raises ReportError."""
    if not path.is_file():
        msg = f"{path} not found"
        if required:
            raise ReportError(msg)
        return None, msg
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} is not valid JSON ({exc})"
        if required:
            raise ReportError(msg) from None
        return None, msg


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ReportError(f"{path} not found: is {path.parent} a run directory (server_app/rundir.py)?")
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path} is corrupt: line {i} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ReportError(f"{path} is corrupt: line {i} is not a round's metrics object")
        if not isinstance(row.get("sites", {}), dict):
            raise ReportError(f"{path} is corrupt: line {i} has 'sites' that is not an object")
        rows.append(row)
    return sorted(rows, key=lambda r: r["round"])


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    rows = _read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(
            f"{summary_path} not found: the run has not finished (or {run_dir} is not a run directory)"
        )
    summary, _ = _read_json_file(summary_path, required=True)
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path} is corrupt: it holds no JSON object")
    notes = []
    config, problem = _read_json_file(run_dir / "config.json", required=False)
    if problem:
        notes.append(f"run config unavailable: {problem}")
    config = config if isinstance(config, dict) else {}
    pool_score, problem = _read_json_file(run_dir / "pool_score.json", required=False)
    if problem and (run_dir / "pool_score.json").exists():
        notes.append(f"pool score unavailable: {problem}")
    return RunData(
        run_dir.resolve(),
        rows,
        summary,
        config.get("run_config") or {},
        config.get("site_profiles") or {},
        pool_score if isinstance(pool_score, dict) else None,
        notes,
    )


# --- formatting -----------------------------------------------------------------------------------


def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if np.isfinite(x) else "n/a"
    return "n/a" if x is None else str(x)


def nbytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def seconds_text(s: Any) -> str:
    if not isinstance(s, int | float):
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def site_names(run: RunData) -> list[str]:
    named = run.summary.get("sites") or []
    seen = {s for r in run.rows for s in r.get("sites", {})} | set(run.summary.get("test") or {})
    return sorted(set(named) | seen)


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
