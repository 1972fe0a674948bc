"""What the benchmark measures besides Dice: inference time per image and peak memory."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import torch


def inference_ms(model: torch.nn.Module, image_size: int, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of one forward pass on one (1,3,S,S) image: batch 1, CPU, no gradient,
    with the torch threads the caller set (the bench uses 1, as every simulated site does)."""
    model = model.cpu().eval()
    x = torch.rand(1, 3, image_size, image_size)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def _group_rss_kb(pgid: int | None, pid: int | None = None) -> int:
    """Summed resident memory of every process in process group ``pgid`` (or of ``pid`` alone)."""
    total = 0
    entries = [Path(f"/proc/{pid}")] if pid is not None else Path("/proc").iterdir()
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if pid is None and int(fields[2]) != pgid:  # field 5 of /proc/PID/stat: process group
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return total


class PeakMemory:
    """Samples the summed RSS of a process group (the SuperLink and everything it started: the
    ServerApp and the simulated sites) every ``every_s`` seconds; ``peak_mb`` is the maximum.
    Without ``pgid`` it samples this process alone (the in-process baselines)."""

    def __init__(self, pgid: int | None = None, every_s: float = 0.5):
        self.pgid = pgid
        self.pid = None if pgid is not None else os.getpid()
        self.every_s = every_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _group_rss_kb(self.pgid, self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _group_rss_kb(self.pgid, self.pid))

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024.0
