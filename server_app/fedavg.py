"""FedAvg baseline (the paper's FedU-Net family) on Flower's message-based ``FedAvg``.

Flower's ``FedAvg`` gives the weighted averaging and message construction; this subclass adds
what a hospital federation needs around it: a site roster from ``query.profile`` with a
consistency check, deadline-bounded sampling, validation of every reply before it is averaged,
an optional held-out site (leave-one-site-out), per-round metrics and traffic, and checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import psutil
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from common import protocol as P
from common.codec import array_shapes, check_weights_record, from_array_record
from common.config import RunConfig
from common.validation import PayloadInvalid, check_eval_metrics, check_profile, check_train_metrics
from server_app.checkpoint import RunPaused, ServerState, restore_rng, save_state
from server_app.federation import Exchange, Federation, FederationStopped
from server_app.round_record import RoundRecord
from server_app.rundir import RunDirectory
from server_app.stage_clock import StageClock

log = logging.getLogger("dsfedmed.server")


class DeadlineFedAvg(RoundRecord, FedAvg):
    def __init__(self, cfg: RunConfig, federation: Federation, rundir: RunDirectory):
        super().__init__(
            min_train_nodes=cfg.min_sites,
            min_evaluate_nodes=cfg.min_sites,
            min_available_nodes=cfg.min_sites,
            weighted_by_key=P.MET_NUM_EXAMPLES,
            arrayrecord_key=P.KEY_ARRAYS,
            configrecord_key=P.KEY_CONFIG,
        )
        self.cfg = cfg
        self.fed = federation
        self.rundir = rundir
        self.train_nodes: list[int] = []  # roster of training sites (holdout excluded)
        self.holdout_node: int | None = None
        self.profiles: dict[str, dict] = {}
        self.require_same_model = True  # weight averaging needs one architecture everywhere
        self.summary_data: dict = {}
        self.history: list[dict] = []  # every metrics row so far (the checkpoint keeps it)
        self.resume: ServerState | None = None  # set to continue an interrupted run
        self._kinds_logged: dict[str, int] = {}  # bytes by kind already in a metrics row
        self.t_run = time.time()

    # --- checkpoint and resume -------------------------------------------------------------
    def _checkpoint(self, rnd: int, strategy_state: dict) -> None:
        save_state(
            self.rundir.checkpoints,
            ServerState(
                round=rnd,
                state_key=self.fed.state_key,
                method=self.cfg.method,
                run_config=self.cfg.to_flat(),
                history=list(self.history),
                traffic_down=dict(self.fed.traffic.down),
                traffic_up=dict(self.fed.traffic.up),
                wall_seconds=time.time() - self.t_run,
                strategy=strategy_state,
            ),
        )

    def _resume(self) -> tuple[int, dict]:
        """Restore what the checkpoint holds; returns (first round to run, strategy state)."""
        st = self.resume
        assert st is not None
        self.history = list(st.history)
        for site, n in st.traffic_down.items():  # on top of what this run booked so far (profiles)
            self.fed.traffic.add(site, down=n)
        for site, n in st.traffic_up.items():
            self.fed.traffic.add(site, up=n)
        for row in self.history:  # bytes by kind: the rows hold each round's share
            for kind, n in (row.get("bytes_by_kind") or {}).items():
                self.fed.traffic.by_kind[kind] = self.fed.traffic.by_kind.get(kind, 0) + n
                self._kinds_logged[kind] = self._kinds_logged.get(kind, 0) + n
        self.t_run = time.time() - st.wall_seconds
        restore_rng(st.rng)
        log.info("resuming at round %d of %d (state key %d)", st.round + 1, self.cfg.num_rounds, st.state_key)
        return st.round + 1, st.strategy

    # --- roster ----------------------------------------------------------------------------
    def profile_sites(self) -> None:
        """``query.profile`` every connected site; refuse to start on an inconsistent federation."""
        cfg = self.cfg
        nodes = self.fed.wait_for_nodes(cfg.min_sites, cfg.sampling_deadline_s)
        msgs = [self.fed.make(n, P.MSG_QUERY_PROFILE, RecordDict()) for n in nodes]
        ex = self.fed.send(msgs, cfg.round_timeout_s)
        by_site: dict[str, int] = {}
        for msg in msgs:
            node = msg.metadata.dst_node_id
            rep = next((r for r in ex.replies.values() if r.metadata.src_node_id == node), None)
            if rep is None:
                continue
            try:  # a malformed profile drops that site, with a clear line; the others go on
                prof = check_profile(rep.content.config_records.get(P.KEY_PROFILE))
            except PayloadInvalid as exc:
                ex.errors[f"node {node}"] = f"rejected profile: {exc}"
                continue
            name = prof["site"]
            if name in by_site:
                raise FederationStopped(
                    f"two SuperNodes report the same site name {name!r} (nodes {by_site[name]} "
                    f"and {node}); give each site a distinct data-dir or site-name"
                )
            by_site[name] = node
            self.fed.name_site(node, name)
            self.profiles[name] = prof
        for site, reason in ex.errors.items():
            log.error("site %s cannot join: %s", site, reason)
        problems = []
        for name, prof in self.profiles.items():
            if self.require_same_model and prof.get("model") != cfg.model:
                problems.append(
                    f"site {name} runs model {prof.get('model')!r} but method {cfg.method} "
                    f"averages weights of one model ({cfg.model!r}); remove its node-config 'model'"
                )
            if int(prof.get("image-size", -1)) != cfg.image_size:
                problems.append(f"site {name} has image-size {prof.get('image-size')}")
            if prof.get("versions") != next(iter(self.profiles.values())).get("versions"):
                log.warning("site %s runs different package versions: %s", name, prof.get("versions"))
        if problems:
            raise FederationStopped("inconsistent federation: " + "; ".join(problems))
        if cfg.holdout_site:
            if cfg.holdout_site not in by_site:
                raise FederationStopped(
                    f"holdout-site {cfg.holdout_site!r} is not among the connected sites "
                    f"({', '.join(sorted(by_site))})"
                )
            self.holdout_node = by_site[cfg.holdout_site]
        self.train_nodes = sorted(n for n in by_site.values() if n != self.holdout_node)
        if len(self.train_nodes) < cfg.min_sites:
            raise FederationStopped(
                f"{len(self.train_nodes)} training site(s) usable "
                f"({', '.join(self.fed.site_of(n) for n in self.train_nodes) or 'none'}); "
                f"min-sites is {cfg.min_sites}; errors: {ex.errors or 'none'}"
            )
        log.info(
            "federation: %d training site(s): %s%s",
            len(self.train_nodes),
            ", ".join(self.fed.site_of(n) for n in self.train_nodes),
            f"; held out: {cfg.holdout_site}" if cfg.holdout_site else "",
        )

    # --- Flower strategy hooks ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.fed.wait_for_nodes(
            self.cfg.min_sites, self.cfg.sampling_deadline_s, among=self.train_nodes
        )
        nodes = self.fed.sample(nodes, self.cfg.sites_per_round, server_round, self.cfg.seed)
        config[P.CFG_ROUND] = server_round
        record = RecordDict({P.KEY_ARRAYS: arrays, P.KEY_CONFIG: config})
        return [self.fed.make(n, P.MSG_TRAIN, record, server_round) for n in nodes]

    def validate_train_reply(self, site: str, msg: Message, reference: ArrayRecord) -> str | None:
        """Why a train reply cannot be averaged, or None when it is fine."""
        return (
            self.validate_metrics(msg)
            or self.validate_example_count(site, msg)
            or self.validate_weights(msg, reference)
        )

    def validate_example_count(self, site: str, msg: Message) -> str | None:
        """A site cannot weigh more in an average than the training images its profile reported."""
        limit = int((self.profiles.get(site) or {}).get("n-train", 0) or 0)
        n = float(msg.content.metric_records[P.KEY_METRICS][P.MET_NUM_EXAMPLES])
        if limit and n > limit:
            return (
                f"'{P.MET_NUM_EXAMPLES}' is {n:g}, more than the {limit} training images its profile reported"
            )
        return None

    @staticmethod
    def validate_metrics(msg: Message) -> str | None:
        """A train reply must carry its metrics with a positive, finite, whole example count (the
        weight); see :func:`common.validation.check_train_metrics`."""
        try:
            check_train_metrics(msg.content.metric_records.get(P.KEY_METRICS))
        except PayloadInvalid as exc:
            return str(exc)
        return None

    @staticmethod
    def validate_weights(msg: Message, reference: ArrayRecord) -> str | None:
        """Weights must match the global model: its byte size (checked before decoding), keys,
        shapes, real dtypes and finite values; see :func:`common.validation.check_weights_record`."""
        try:
            check_weights_record(
                msg.content.array_records.get(P.KEY_ARRAYS), array_shapes(reference), "the global model"
            )
        except PayloadInvalid as exc:
            return str(exc)
        return None

    # --- the round loop ----------------------------------------------------------------------
    def _evaluate(
        self, arrays: ArrayRecord | None, server_round: int, split: str, nodes: list[int]
    ) -> Exchange:
        """Evaluate on ``split``; without ``arrays`` each site evaluates its own model."""
        cfg = ConfigRecord({P.CFG_SPLIT: split, P.CFG_MODEL: self.cfg.model, P.CFG_ROUND: server_round})
        record = RecordDict({P.KEY_CONFIG: cfg})
        if arrays is not None:
            record[P.KEY_ARRAYS] = arrays
        live = set(self.fed.grid.get_node_ids())
        self.fed.mark_absent(n for n in nodes if n not in live)
        msgs = [self.fed.make(n, P.MSG_EVALUATE, record, server_round) for n in nodes if n in live]
        return self.fed.send(msgs, self.cfg.round_timeout_s)

    def _validation_due(self, rnd: int, num_rounds: int) -> bool:
        """Every ``evaluate-every`` rounds and after the last; never with ``evaluate-every`` 0."""
        k = self.cfg.evaluate_every
        return k > 0 and (rnd % k == 0 or rnd == num_rounds)

    def _evaluate_round(self, arrays: ArrayRecord | None, rnd: int, num_rounds: int) -> Exchange:
        """Validation after round ``rnd`` by evaluate messages, when due and not carried by the train
        replies (``evaluate-in-train``)."""
        if self.cfg.evaluate_in_train or not self._validation_due(rnd, num_rounds):
            return Exchange()
        return self._evaluate(arrays, rnd, "val", self.train_nodes)

    def _train_config(self, conf: dict, rnd: int, num_rounds: int) -> dict:
        """A train request's config, asking for the site's own validation when it is due and
        ``evaluate-in-train`` is set."""
        if self.cfg.evaluate_in_train and self._validation_due(rnd, num_rounds):
            conf = {**conf, P.CFG_EVALUATE_SPLIT: "val"}
        return conf

    def _round_scores(self, ev: Exchange, train_ex: Exchange | None, rnd: int, num_rounds: int) -> dict:
        """The round's validation scores: from the evaluate replies, or with ``evaluate-in-train``
        from the accepted train replies' ``val-*`` metrics (a site whose policy declined sends none)."""
        if not (
            self.cfg.evaluate_in_train and train_ex is not None and self._validation_due(rnd, num_rounds)
        ):
            return self._scores(ev)
        out = {}
        for site, rep in train_ex.replies.items():
            if site in train_ex.errors:
                continue
            m = rep.content.metric_records.get(P.KEY_METRICS) or {}
            own = {k[len(P.MET_VAL_PREFIX) :]: v for k, v in m.items() if k.startswith(P.MET_VAL_PREFIX)}
            if own:
                out.update(self._score(site, own, train_ex))
        return out

    @staticmethod
    def _scores(ex: Exchange, what: str = "evaluate reply") -> dict[str, dict]:
        """Per-site Dice/IoU of the evaluate replies that pass
        :func:`common.validation.check_eval_metrics`; the others are booked as errors."""
        out = {}
        for site, rep in ex.replies.items():
            out.update(DeadlineFedAvg._score(site, rep.content.metric_records.get(P.KEY_METRICS), ex, what))
        return out

    @staticmethod
    def _score(site: str, metrics, ex: Exchange, what: str = "train reply's validation") -> dict[str, dict]:
        """``{site: scores}`` when ``metrics`` pass :func:`common.validation.check_eval_metrics`;
        otherwise empty, and the reason booked in ``ex.errors``."""
        try:
            m = check_eval_metrics(metrics)
        except PayloadInvalid as exc:
            ex.errors[site] = f"rejected {what}: {exc}"
            log.warning("site %s: %s", site, ex.errors[site])
            return {}
        return {
            site: {
                "dice": m.get(P.MET_DICE, float("nan")),
                "iou": m.get(P.MET_IOU, float("nan")),
                "dice05": m.get(P.MET_DICE05, float("nan")),
                "iou05": m.get(P.MET_IOU05, float("nan")),
                "n": int(m[P.MET_NUM_EXAMPLES]),
            }
        }

    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float, **_: object
    ) -> Result:
        cfg, fed = self.cfg, self.fed
        result = Result()
        self.t_run = time.time()
        self.rss_baseline_mb = round(psutil.Process().memory_info().rss / 2**20, 1)  # before the run's work
        self.profile_sites()
        arrays = initial_arrays
        if self.resume is not None:
            first, st = self._resume()
            arrays = ArrayRecord({k: Array(v) for k, v in st["arrays"].items()})
            initial_test = st["initial_test"]
        else:
            # round 0: the untrained model, on validation (curve) and test (baseline for the summary)
            first, t0, before = 1, self.t_run, ({}, {})  # round 0 also books the profile exchange
            ev = self._evaluate(arrays, 0, "val", self.train_nodes) if cfg.evaluate_every else Exchange()
            initial_test = self._scores(self._evaluate(arrays, 0, "test", self.train_nodes))
            row = self._metrics_row(0, self._scores(ev), {}, ev, None, before, t0)
            self._write_row(row, state=self._state(arrays, initial_test))
            self._plot()

        completed, clock = first - 1, StageClock()
        for rnd in range(first, num_rounds + 1):
            t0, before = time.time(), (dict(fed.traffic.down), dict(fed.traffic.up))
            self.fed.progress.round(rnd, num_rounds)
            train_cfg = ConfigRecord(self._train_config({P.CFG_MODEL: cfg.model}, rnd, num_rounds))
            with clock.stage("send"):  # message building, waiting for the sites, their replies
                ex = fed.send(self.configure_train(rnd, arrays, train_cfg, grid), timeout)
            with clock.stage("aggregate"):
                arrays, losses = self._accept_and_aggregate(rnd, ex, arrays, result)
            with clock.stage("evaluate"):
                ev = self._evaluate_round(arrays, rnd, num_rounds)
                scores = self._round_scores(ev, ex, rnd, num_rounds)
            self._record_validation(result, rnd, scores)
            with clock.stage("record_prev"):
                row = self._metrics_row(rnd, scores, losses, ev, ex, before, t0, clock.take())
                self._write_row(row, state=self._state(arrays, initial_test))
                self.rundir.save_checkpoint(
                    f"global_round_{rnd:03d}.pt",
                    from_array_record(arrays),
                    {"round": rnd, "model": cfg.model, "method": cfg.method},
                )
                self._plot()
            completed = rnd
            self._pause_if_due(rnd)

        final, holdout = self._final_evaluation(arrays, num_rounds)
        self.rundir.save_checkpoint(
            "global_final.pt",
            from_array_record(arrays),
            {"round": completed, "model": cfg.model, "method": cfg.method},
        )
        self.summary_data = self._summary(completed, final, initial_test, holdout, self.t_run)
        return result

    def _accept_and_aggregate(
        self, rnd: int, ex: Exchange, arrays: ArrayRecord, result: Result
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """The train replies that pass validation, averaged (Flower's FedAvg); the others are booked
        as errors. Too few usable replies stop the run. Returns the new global model and the losses."""
        valid, losses = [], {}
        for site, rep in ex.replies.items():
            why = self.validate_train_reply(site, rep, arrays)
            if why:
                ex.errors[site] = f"rejected train reply: {why}"
                log.warning("site %s: %s", site, ex.errors[site])
                continue
            valid.append(rep)
            losses[site] = float(rep.content.metric_records[P.KEY_METRICS].get(P.MET_LOSS, np.nan))
        if len(valid) < self.cfg.min_sites:
            raise FederationStopped(
                f"round {rnd}: {len(valid)} usable train repl(ies), min-sites is {self.cfg.min_sites}; "
                f"errors: {ex.errors or 'none'}; no answer: {ex.timeouts or 'none'}"
            )
        new_arrays, agg = self.aggregate_train(rnd, valid)
        if new_arrays is not None:
            arrays = new_arrays
            result.arrays = arrays
        if agg is not None:
            result.train_metrics_clientapp[rnd] = agg
        return arrays, losses

    @staticmethod
    def _state(arrays: ArrayRecord, initial_test: dict) -> dict:
        return {"arrays": from_array_record(arrays), "initial_test": initial_test}

    def _final_evaluation(self, arrays: ArrayRecord | None, num_rounds: int) -> tuple[dict, dict | None]:
        """Test split at every training site; the held-out site (if any) on all its data."""
        final = self._scores(self._evaluate(arrays, num_rounds, "test", self.train_nodes))
        holdout = None
        if self.holdout_node is not None:
            hs = self._scores(self._evaluate(arrays, num_rounds, "all", [self.holdout_node]))
            site = self.cfg.holdout_site
            holdout = {"site": site, **hs.get(site, {"dice": None, "iou": None, "n": 0})}
        return final, holdout

    def _pause_if_due(self, rnd: int) -> None:
        """After round ``rnd``'s files are all written (row, checkpoints, plot): stop cleanly when the
        run config asks for a pause there."""
        if 0 < self.cfg.pause_after_round == rnd and rnd < self.cfg.num_rounds:
            raise RunPaused(rnd)
