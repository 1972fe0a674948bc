"""Per-round metrics for TensorBoard (optional: only where the ``tensorboard`` extra is installed).

Every metrics row the run directory records also goes to ``<run-dir>/tensorboard/`` as scalars:
mean and per-site Dice/IoU, bytes down/up, round seconds, the number of dropped sites and the
selection statistics. Sites never need the package; without it the server says so once and goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("dsfedmed.server")


def scalars(row: dict) -> dict[str, float]:
    """The numeric series of one metrics row, by TensorBoard tag."""
    out: dict[str, float] = {}

    def put(tag: str, v) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, int | float) and v == v:  # not NaN
            out[tag] = float(v)

    for key in ("dice_mean", "iou_mean", "bytes_down", "bytes_up", "seconds"):
        put(f"round/{key}", row.get(key))
    put("round/dropped_sites", len(row.get("dropped", [])))
    for site, s in (row.get("sites") or {}).items():
        for k in ("dice", "iou", "train_loss"):
            put(f"site/{site}/{k}", s.get(k))
    for k, v in (row.get("selection") or {}).items():
        put(f"selection/{k}", v)
    return out


class MetricsBoard:
    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, folder: Path) -> MetricsBoard | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("TensorBoard logging off: install the 'tensorboard' extra to get it")
            return None
        return cls(SummaryWriter(log_dir=str(folder)))

    def write(self, row: dict) -> None:
        step = int(row.get("round", 0))
        for tag, v in scalars(row).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
