"""What the server is doing right now: rounds and "waiting for k/N sites".

On a terminal (``flwr run`` streams the ServerApp's output) a rich progress display shows the
rounds and the current exchange; everywhere, log lines say the same at most every ``every_s``
seconds, naming the sites still awaited, so a SuperExec log or ``flwr log`` shows it as well.
"""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("dsfedmed.server")


class ServerProgress:
    def __init__(self, live: bool | None = None, every_s: float = 15.0):
        console = Console(stderr=True)
        self.live = console.is_terminal if live is None else live
        self.every_s = every_s
        self._bar = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if self.live
            else None
        )
        self._rounds = self._exchange = None
        self._last_log = 0.0

    def start(self, num_rounds: int) -> None:
        if self._bar is not None:
            self._bar.start()
            self._rounds = self._bar.add_task("rounds", total=num_rounds)

    def round(self, rnd: int, num_rounds: int) -> None:
        log.info("[round %d/%d]", rnd, num_rounds)
        if self._bar is not None and self._rounds is not None:
            self._bar.update(self._rounds, completed=rnd - 1, total=num_rounds, description=f"round {rnd}")

    def exchange(
        self, label: str, answered: int, total: int, waiting: list[str], elapsed: float, timeout: float
    ):
        """Called while replies come in (and once more when the exchange ends)."""
        if self._bar is not None:
            if self._exchange is None:
                self._exchange = self._bar.add_task(label, total=total)
            self._bar.update(self._exchange, completed=answered, total=total, description=f"{label}: sites")
        now = time.monotonic()
        if waiting and now - self._last_log >= self.every_s:
            self._last_log = now
            log.info(
                "%s: waiting for %d/%d sites (%s), %.0f s of %.0f s",
                label,
                len(waiting),
                total,
                ", ".join(waiting),
                elapsed,
                timeout,
            )
        if not waiting and self._bar is not None and self._exchange is not None:
            self._bar.remove_task(self._exchange)
            self._exchange = None

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
