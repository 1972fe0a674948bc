"""The server's own cost per round, stage by stage: CPU seconds of the ServerApp's thread
(``time.thread_time``: waiting for sites costs none, work on other threads is not counted) and wall
seconds. A round's record (checkpoint, row, plot) happens after its row is built, so it is booked in
the next round's row as ``record_prev``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        c0, w0 = time.thread_time(), time.monotonic()
        try:
            yield
        finally:
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0
            self.wall[name] = self.wall.get(name, 0.0) + time.monotonic() - w0

    def take(self) -> dict:
        """The stages measured since the last call, for a metrics row, and a fresh start."""
        out = {
            "server_cpu_s": {k: round(v, 4) for k, v in self.cpu.items()},
            "server_cpu_s_total": round(sum(self.cpu.values()), 4),
            "server_wall_s": {k: round(v, 4) for k, v in self.wall.items()},
        }
        self.cpu, self.wall = {}, {}
        return out
