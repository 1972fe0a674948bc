"""What the benchmark measures besides Dice: inference time per image and peak memory."""

from __future__ import annotations

import os
import statistics
import threading
import time

import psutil
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


def tree_rss_kb(root: int) -> int:
    """Summed resident memory (kB) of ``root`` and all its descendants (psutil; a process group is
    not enough, Flower's SuperExec starts its own session)."""
    total = 0
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss // 1024
        except psutil.Error:
            continue  # the process ended while we looked
    return total


class PeakMemory:
    """Samples the summed RSS of a process tree (the SuperLink and everything it started: SuperExec,
    the ServerApp, Ray and the simulated sites) every ``every_s`` seconds; ``peak_mb`` is the
    maximum. Without ``root`` it samples this process (the in-process baselines)."""

    def __init__(self, root: int | None = None, every_s: float = 0.5):
        self.root = root if root is not None else os.getpid()
        self.every_s = every_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.root))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(self.root))

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024.0
