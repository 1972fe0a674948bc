"""What a round leaves behind: its metrics row (scores, losses, traffic by site and kind, optimiser
steps, DP, errors, drops), the checkpoint written before it, the Dice plot, and the run's summary.

A mixin of :class:`server_app.fedavg.DeadlineFedAvg` (and so of DSFedMed): it reads the strategy's
``cfg``, ``fed``, ``rundir``, ``history``, ``train_nodes`` and ``_kinds_logged``, and calls its
``_checkpoint``."""

from __future__ import annotations

import logging
import math
import resource
import time

import numpy as np
import psutil
from flwr.app import MetricRecord
from flwr.serverapp.strategy.result import Result

from common import protocol as P
from server_app.federation import Exchange
from server_app.plots import plot_dice
from server_app.rundir import json_safe

log = logging.getLogger("dsfedmed.server")


class RoundRecord:
    @staticmethod
    def _mean(scores: dict[str, dict], key: str) -> float | None:
        vals = [s[key] for s in scores.values() if s.get("n", 0) > 0 and np.isfinite(s[key])]
        return float(np.mean(vals)) if vals else None

    def _summary(
        self, completed: int, final: dict, initial_test: dict, holdout: dict | None, t_run: float
    ) -> dict:
        fed = self.fed
        fed.collect_late()  # replies that came after their deadline still count as traffic
        return {
            "status": "completed",
            "method": self.cfg.method,
            "model": self.cfg.model,
            "rounds": completed,
            "sites": [fed.site_of(n) for n in self.train_nodes],
            "test": final,
            "dice_test_mean": self._mean(final, "dice"),
            "iou_test_mean": self._mean(final, "iou"),
            "dice05_test_mean": self._mean(final, "dice05"),
            "iou05_test_mean": self._mean(final, "iou05"),
            "initial_test": initial_test,
            "dice_test_initial_mean": self._mean(initial_test, "dice"),
            "dice05_test_initial_mean": self._mean(initial_test, "dice05"),
            "holdout": holdout,
            "bytes_down_total": fed.traffic.total_down,
            "bytes_up_total": fed.traffic.total_up,
            "bytes_total": fed.traffic.total_down + fed.traffic.total_up,
            "bytes_by_kind": dict(sorted(fed.traffic.by_kind.items())),
            **self.step_totals(),
            "wall_seconds": time.time() - t_run,
            "server_rss_baseline_mb": getattr(self, "rss_baseline_mb", None),
        }

    def step_totals(self) -> dict:
        """Optimiser steps per site over the run so far (from the metrics rows, so a resumed run
        counts the interrupted run's rounds too): private data and distillation apart."""
        private: dict[str, int] = {}
        distill: dict[str, int] = {}
        for row in self.history:
            for site, s in (row.get("steps") or {}).items():
                private[site] = private.get(site, 0) + int(s.get("private", 0))
                distill[site] = distill.get(site, 0) + int(s.get("distill", 0))
        return {"steps_private_per_site": private, "steps_distill_per_site": distill}

    @staticmethod
    def _steps(train_ex: Exchange | None) -> dict[str, dict[str, int]]:
        """Each accepted train reply's optimiser steps this round (private, distillation)."""
        out: dict[str, dict[str, int]] = {}
        if train_ex is None:
            return out
        for site, rep in train_ex.replies.items():
            if site in train_ex.errors:
                continue
            m = rep.content.metric_records.get(P.KEY_METRICS) or {}
            out[site] = {
                "private": int(float(m.get(P.MET_STEPS, 0) or 0)),
                "distill": int(float(m.get(P.MET_DISTILL_STEPS, 0) or 0)),
            }
        return out

    @staticmethod
    def _dp(train_ex: Exchange | None) -> dict[str, float]:
        """The sites whose accepted answers this round were noised under their DP policy, with
        each one's total ε (over every run, as its own ledger counts it)."""
        out: dict[str, float] = {}
        if train_ex is None:
            return out
        for site, rep in train_ex.replies.items():
            m = rep.content.metric_records.get(P.KEY_METRICS) or {}
            v = m.get(P.MET_DP_EPSILON)
            if site not in train_ex.errors and isinstance(v, int | float) and math.isfinite(v):
                out[site] = float(v)
        return out

    def _record_validation(self, result: Result, rnd: int, scores: dict) -> None:
        """Flower's per-round evaluation history; rounds without validation (evaluate-every) have none."""
        if scores:
            result.evaluate_metrics_clientapp[rnd] = MetricRecord(
                {"dice-mean": self._mean(scores, "dice") or 0.0}
            )

    def _metrics_row(self, rnd, scores, losses, ev, train_ex, before, t0, extra=None) -> dict:
        """Round ``rnd``'s metrics row: scores, losses, traffic (per site and by kind) since
        ``before``, optimiser steps, errors and the sites that took no part."""
        fed = self.fed
        per_site = {}
        for site in set(fed.traffic.down) | set(fed.traffic.up):
            d = fed.traffic.down.get(site, 0) - before[0].get(site, 0)
            u = fed.traffic.up.get(site, 0) - before[1].get(site, 0)
            if d or u:
                per_site[site] = {"down": d, "up": u}
        sites = {}
        for site, s in scores.items():
            sites[site] = dict(s)
            if site in losses:
                sites[site]["train_loss"] = losses[site]
        errors = dict(ev.errors)
        timeouts = list(ev.timeouts)
        if train_ex is not None:
            errors.update({s: r for s, r in train_ex.errors.items()})
            timeouts = sorted(set(timeouts) | set(train_ex.timeouts))
        absent = self.fed.take_absent()
        kinds = {
            k: v - self._kinds_logged.get(k, 0)
            for k, v in fed.traffic.by_kind.items()
            if v - self._kinds_logged.get(k, 0)
        }
        self._kinds_logged = dict(fed.traffic.by_kind)
        return {
            "round": rnd,
            "sites": sites,
            "dice_mean": self._mean(scores, "dice"),
            "iou_mean": self._mean(scores, "iou"),
            "dice05_mean": self._mean(scores, "dice05"),
            "bytes_down": sum(v["down"] for v in per_site.values()),
            "bytes_up": sum(v["up"] for v in per_site.values()),
            "bytes_per_site": per_site,
            "bytes_by_kind": kinds,
            "steps": self._steps(train_ex),
            "dp_epsilon": self._dp(train_ex),  # sites whose answers were noised: their total ε
            "seconds": time.time() - t0,
            "errors": errors,
            # sites of the roster that took no part: no answer in time, or gone before they were asked
            "dropped": sorted(set(timeouts) | set(absent)),
            "absent": absent,
            # the server process's resident memory at the round's end (the ServerApp's own process;
            # in simulation the sites run elsewhere)
            "server_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            # and its high-water mark so far (transient peaks between round ends included)
            "server_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            # evaluate-in-train: the sites' own models after training, before any aggregation
            **({"validation_from": "train-replies"} if self.cfg.evaluate_in_train and scores else {}),
            **(extra or {}),
        }

    def _write_row(self, row: dict, state: dict | None = None) -> None:
        """Record a metrics row: with ``state`` (the strategy's state after the round) the server
        checkpoint is written first, so a row on disk always has its checkpoint; then the row
        (metrics.jsonl and TensorBoard) and the log line."""
        self.history.append(json_safe(row))
        if state is not None:
            self._checkpoint(row["round"], state)
        self.rundir.append_metrics(row)
        dm = row["dice_mean"]
        log.info(
            "round %d: dice_mean=%s, %d site(s), down %.1f kB, up %.1f kB, %.1f s%s",
            row["round"],
            f"{dm:.3f}" if dm is not None else "n/a",
            len(row["sites"]),
            row["bytes_down"] / 1e3,
            row["bytes_up"] / 1e3,
            row["seconds"],
            f", errors: {row['errors']}" if row["errors"] else "",
        )

    def _plot(self) -> None:
        try:
            plot_dice(
                self.rundir.read_metrics(),
                self.rundir.path / "dice.png",
                f"{self.cfg.method} / {self.cfg.model}",
            )
        except Exception as exc:  # noqa: BLE001 - a plot must never stop a federation
            log.warning("could not draw dice.png: %s", exc)
