"""The run directory: resolved config, per-round metrics, summary, checkpoints and plots.

Layout (``runs/<UTC timestamp>-<method>/`` unless ``run-dir`` is set)::

    config.json      resolved run config (+ site profiles once known)
    metrics.jsonl    one JSON object per round (round 0 = before training)
    summary.json     final per-site and mean Dice/IoU on the test split, holdout, traffic, time
    checkpoints/     model weights the server holds (global model for FedAvg)
    dice.png         Dice per round per site
    tensorboard/     the same per-round metrics for TensorBoard (run config tensorboard, if installed)
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.fileio import atomic_write, atomic_write_text


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.board = None  # a server_app.board.MetricsBoard when TensorBoard logging is on

    @classmethod
    def create(cls, runs_root: str, run_dir: str, method: str) -> RunDirectory:
        if run_dir:
            path = Path(run_dir).expanduser()
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            path = Path(runs_root).expanduser() / f"{stamp}-{method}"
            n = 1
            while path.exists():  # two runs in the same second
                n += 1
                path = Path(runs_root).expanduser() / f"{stamp}-{method}-{n}"
        path = path.resolve()
        if (path / "metrics.jsonl").exists():
            raise FileExistsError(f"run directory {path} already holds a run; choose another run-dir")
        return cls(path)

    def write_json(self, name: str, data: dict) -> Path:
        p = self.path / name
        atomic_write_text(p, json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n")
        return p

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(json_safe(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.board is not None:
            self.board.write(row)

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def save_checkpoint(self, name: str, state: dict[str, np.ndarray], meta: dict) -> Path:
        import torch

        p = self.checkpoints / name
        payload = {
            "state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
            "meta": json_safe(meta),
        }
        return atomic_write(p, lambda tmp: torch.save(payload, tmp))
