"""DSFedMed: mutual distillation between the server's foundation model and the sites' models.

Before round 1 (``_setup``/``_round_zero``): the synthetic pool (server_app/pool_stage.py), its
quality score, the prompt-free FM teacher on the pool's cached embeddings, adapted on the pool, then
(``fm-site-rounds``) on the sites' real images at the sites (server_app/teacher_sites.py).

Round r, a short loop over named stages (see common/protocol.py for the records):
  a. ``_stage_select``: the FM's probabilities on every pool sample; learnability-guided selection
     of S_r (server_app/selection.py) with the sites' last ensemble, which covers the whole pool;
  b. ``_stage_train_messages``/``_stage_accept``: sites get the pool once (then by id) and their
     targets on S_r (the FM mixed with the *other* sites' answers, server_app/targets.py); they
     train supervised on every pool sample, distil on S_r only, then train on private data, and
     reply with their probabilities on the whole pool (``logits``), their weights (``weights``,
     server_app/weights_exchange.py), or both (``hybrid``);
  c. ``_stage_aggregate``/``_stage_teacher``: the ensemble of the sites' answers (weighted by
     training-set size), and the FM's mask decoder trained on every pool mask with KL towards the
     ensemble on S_r (sites -> FM);
  d. evaluate: sites report Dice/IoU of their model on their validation split; the row is written.
After the last round (``_finish``) a held-out site bootstraps from the pool and the final targets.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.result import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import protocol as P
from common.codec import check_probs_record, encode_probs, from_array_record, to_array_record
from common.foundation import fm_checkpoint_id, load_foundation_model
from common.losses import DistillWeights
from common.runtime import resolve_device
from common.transforms import resize_pairs
from common.validation import PayloadInvalid
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import Exchange, FederationStopped
from server_app.holdout import HoldoutBootstrap
from server_app.pool_stage import PoolStage
from server_app.round_state import Replies, RoundState, Selection
from server_app.selection import SelectionConfig, select
from server_app.stage_clock import StageClock
from server_app.targets import Targets
from server_app.targets import ensemble as ensemble_of
from server_app.teacher import FoundationTeacher
from server_app.teacher_sites import TeacherAtSites
from server_app.weights_exchange import WeightsExchange

log = logging.getLogger("dsfedmed.server")


class DSFedMedStrategy(PoolStage, TeacherAtSites, HoldoutBootstrap, WeightsExchange, DeadlineFedAvg):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.require_same_model = self.cfg.exchange != "logits"
        self.device = resolve_device(self.cfg.device)
        self.weights = DistillWeights(
            self.cfg.sup_weight, self.cfg.kd_weight, self.cfg.temperature, self.cfg.pos_weight
        )
        self.pool_seed = self.cfg.pool_seed if self.cfg.pool_seed >= 0 else self.cfg.seed

    # --- round pieces --------------------------------------------------------------------------
    def _validate_probs(self, rep, n: int) -> tuple[torch.Tensor | None, str | None]:
        """A reply's probabilities on the ``n`` selected samples, decoded, or why they cannot be used:
        :func:`common.validation.check_probs_record` (exactly ``n`` maps at logit-size in the run's
        logit-dtype, bytes bounded before decoding, finite, within [0, 1])."""
        try:
            rec = rep.content.array_records.get(P.KEY_SITE_PROBS)
            return check_probs_record(rec, n, self.cfg.logit_size, self.cfg.logit_dtype), None
        except PayloadInvalid as exc:
            return None, str(exc)

    # --- the run: setup, then a short loop over named stages ----------------------------------
    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float, **_: object
    ) -> Result:
        cfg = self.cfg
        self.t_run = time.time()
        self.rss_baseline_mb = round(psutil.Process().memory_info().rss / 2**20, 1)  # before the run's work
        result = Result()
        t0, before = self.t_run, ({}, {})  # round 0 also books profile, generator and pool traffic
        self.profile_sites()
        st = self.resume.strategy if self.resume is not None else None
        rs = self._setup(initial_arrays, st)
        if st is None:
            first = 1
            self._round_zero(rs, t0, before)
        else:
            first, _ = self._resume()
            rs.restore(st, self.fed, self.train_nodes)
        sel_cfg = SelectionConfig(
            rule=cfg.selection_rule,
            lam=cfg.selection_lambda,
            rho=cfg.selection_rho,
            quantile=cfg.selection_quantile,
            pos_weight=cfg.pos_weight,
        )
        completed, clock = first - 1, StageClock()
        for rnd in range(first, num_rounds + 1):
            t0, before = time.time(), (dict(self.fed.traffic.down), dict(self.fed.traffic.up))
            self.fed.progress.round(rnd, num_rounds)
            with clock.stage("select"):  # a. score every pool sample, select S_r
                sel = self._stage_select(rs, sel_cfg)
            with clock.stage("send"):  # b. sites train (message building, waiting, replies)
                ex = self.fed.send(self._stage_train_messages(rs, sel, rnd, num_rounds), timeout)
            with clock.stage("aggregate"):  # b./c. validated replies, ensemble (or FedAvg)
                replies = self._stage_accept(rs, ex, rnd)
                self._stage_aggregate(rs, replies, sel, rnd, result)
            with clock.stage("teacher"):  # c. sites -> FM
                fm_loss = self._stage_teacher(rs, sel, rnd)
            with clock.stage("evaluate"):  # d. validation
                ev = self._evaluate_round(rs.arrays, rnd, num_rounds)
                scores = self._round_scores(ev, ex, rnd, num_rounds)
            self._record_validation(result, rnd, scores)
            extra = {
                "selection": sel.stats,
                "selected": [int(i) for i in sel.idx],
                "fm_distill_loss": fm_loss,
                "pool_sent_whole": True,
                **clock.take(),
            }
            with clock.stage("record_prev"):
                self._write_row(
                    self._metrics_row(rnd, scores, replies.losses, ev, ex, before, t0, extra),
                    state=rs.checkpoint(self.fed),
                )
                self._stage_round_files(rs, rnd)
            completed = rnd
            self._pause_if_due(rnd)
        self._finish(rs, completed, num_rounds)
        return result

    def _setup(self, initial_arrays: ArrayRecord, st: dict | None) -> RoundState:
        """The pool (built, reused or resumed), its quality score, the FM teacher on its cached
        embeddings, and the exchange state."""
        cfg = self.cfg
        pool = self.build_pool() if st is None else self._resumed_pool(st["pool_id"])
        # the pool travels at the size it was made at; the FM and server models see it at image-size,
        # resized exactly as the sites resize it
        pool_images, pool_masks = resize_pairs(pool.images, pool.masks, cfg.image_size)
        has_pool: set[int] = set()
        pool_score = self.score_pool(pool, has_pool) if st is None else st["pool_score"]
        fm = load_foundation_model(
            cfg.fm, cfg.fm_checkpoint, self.device, expected_sha256=cfg.fm_checkpoint_sha256
        )
        embed_cache = (
            Path(cfg.pool_dir).expanduser() / f"fm-embeddings-{cfg.fm}-{pool.pool_id}-{cfg.image_size}px.pt"
            if cfg.pool_dir
            else None
        )
        teacher = FoundationTeacher(
            fm,
            pool_images,
            pool_masks,
            cfg.fm_prompt,
            cfg.fm_learning_rate,
            log.info,
            cache=embed_cache,
            cache_key={
                "fm": cfg.fm,
                "checkpoint": fm_checkpoint_id(cfg.fm_checkpoint),
                "pool": pool.pool_id,
                "image_size": cfg.image_size,
            },
        )
        weights_mode = cfg.exchange in ("weights", "hybrid")
        return RoundState(
            pool=pool,
            pool_images=pool_images,
            pool_masks=pool_masks,
            pool_score=pool_score,
            has_pool=has_pool,
            fm=fm,
            teacher=teacher,
            weights_mode=weights_mode,
            arrays=initial_arrays if weights_mode else None,
            ensemble=torch.zeros(len(pool), 1, cfg.logit_size, cfg.logit_size),
            known=np.zeros(len(pool), bool),
            masks_small=teacher.masks_at(np.arange(len(pool)), cfg.logit_size),
        )

    def _round_zero(self, rs: RoundState, t0: float, before: tuple) -> None:
        """Before round 1: the teacher adapts on the pool, then the untrained site models are
        validated and tested (the baseline of the summary)."""
        cfg = self.cfg
        adapt_loss = float("nan")
        if cfg.fm_adapt_epochs > 0:  # the prompt-free teacher learns the task on the pool first
            adapt_loss = rs.teacher.adapt(cfg.fm_adapt_epochs, self.weights, seed=cfg.seed)
            log.info(
                "FM decoder adapted on the pool: %d epoch(s), loss %.4f", cfg.fm_adapt_epochs, adapt_loss
            )
        # then on the sites' real images, which only the sites can show it
        site_rounds = self.teacher_at_sites(rs) if cfg.fm_site_rounds > 0 else []
        self.rundir.save_checkpoint(
            "fm_decoder_adapted.pt", rs.teacher.decoder_state(), {"round": 0, "fm": cfg.fm}
        )
        ev = self._evaluate(rs.arrays, 0, "val", self.train_nodes) if cfg.evaluate_every else Exchange()
        rs.initial_test = self._scores(self._evaluate(rs.arrays, 0, "test", self.train_nodes))
        extra = {
            "pool_id": rs.pool.pool_id,
            "pool_size": len(rs.pool),
            "pool_score": rs.pool_score,
            "fm_adapt_loss": adapt_loss,
            "fm_site_rounds": site_rounds,
        }
        self._write_row(
            self._metrics_row(0, self._scores(ev), {}, ev, None, before, t0, extra),
            state=rs.checkpoint(self.fed),
        )
        self._plot()

    def _stage_select(self, rs: RoundState, sel_cfg: SelectionConfig) -> Selection:
        """a. The FM's probabilities (T = 1) on every pool sample; learnability-guided selection of
        the samples distillation applies to, with the sites' last ensemble."""
        fm_probs = rs.teacher.probs(None, self.cfg.logit_size)
        ens_view = None
        if rs.known.any():
            ens_view = torch.where(torch.from_numpy(rs.known)[:, None, None, None], rs.ensemble, fm_probs)
        idx, stats = select(fm_probs, rs.masks_small, ens_view, sel_cfg)
        gate = torch.zeros(len(rs.pool))
        gate[torch.from_numpy(idx)] = 1.0
        return Selection(idx=idx, gate=gate, stats=stats, fm_probs=fm_probs)

    def _stage_train_messages(
        self, rs: RoundState, sel: Selection, rnd: int, num_rounds: int | None = None
    ) -> list:
        """b. One train message per available site: the whole pool the first time (then by id),
        its own targets on S_r (FM mixed with the *other* sites' answers), and in weights/hybrid
        exchange the global site model."""
        cfg, fed = self.cfg, self.fed
        nodes = fed.wait_for_nodes(cfg.min_sites, cfg.sampling_deadline_s, among=self.train_nodes)
        nodes = fed.sample(nodes, cfg.sites_per_round, rnd, cfg.seed)  # partial participation
        msgs, targets = [], Targets(sel.fm_probs, rs.site_probs, rs.site_counts)  # one pass per round
        for n in nodes:
            tgt = targets.of(fed.site_of(n), cfg.target_fm_weight)
            conf = {
                P.CFG_ROUND: rnd,
                P.CFG_POOL_ID: rs.pool.pool_id,
                P.CFG_SELECTED: [int(i) for i in sel.idx],
                P.CFG_EXCHANGE: cfg.exchange,
                P.CFG_MODEL: cfg.model,
                P.CFG_POOL_INCLUDED: "none" if n in rs.has_pool else "all",
            }
            rec = RecordDict(
                {
                    P.KEY_SOFT: to_array_record(
                        {P.ARR_PROBS: encode_probs(tgt[sel.idx], cfg.logit_size, cfg.logit_dtype)}
                    )
                }
            )
            if n not in rs.has_pool:
                rec[P.KEY_POOL] = to_array_record({P.ARR_IMAGES: rs.pool.images, P.ARR_MASKS: rs.pool.masks})
            rec[P.KEY_CONFIG] = ConfigRecord(self._train_config(conf, rnd, num_rounds or self.cfg.num_rounds))
            if rs.weights_mode:
                rec[P.KEY_ARRAYS] = rs.arrays
            msgs.append(fed.make(n, P.MSG_TRAIN, rec, rnd))
        return msgs

    def _stage_accept(self, rs: RoundState, ex, rnd: int) -> Replies:
        """b. The replies that pass validation (metrics, example count, probabilities on the whole
        pool, weights); the others are booked as errors. A site that lost its pool copy (error code
        ERR_NO_POOL) is sent the pool again next round. Too few usable replies stop the run."""
        cfg = self.cfg
        out = Replies()
        for site, rep in ex.replies.items():
            why = self.validate_metrics(rep) or self.validate_example_count(site, rep)
            p = None
            if not why and cfg.exchange in ("logits", "hybrid"):
                p, why = self._validate_probs(rep, len(rs.pool))
            if not why and rs.weights_mode:
                why = self.validate_weights(rep, rs.arrays)
            if why:
                ex.errors[site] = f"rejected train reply: {why}"
                log.warning("site %s: %s", site, ex.errors[site])
                continue
            rs.has_pool.add(rep.metadata.src_node_id)
            out.valid.append(rep)
            m = rep.content.metric_records[P.KEY_METRICS]
            out.counts[site] = float(m[P.MET_NUM_EXAMPLES])
            out.losses[site] = float(m.get(P.MET_LOSS, np.nan))
            if p is not None:
                out.probs[site] = p
        for site, code in ex.error_codes.items():
            if code == P.ERR_NO_POOL:  # the site lost its copy: send the pool again next round
                rs.has_pool.difference_update(n for n, s in self.fed.sites.items() if s == site)
        if len(out.valid) < cfg.min_sites:
            raise FederationStopped(
                f"round {rnd}: {len(out.valid)} usable train repl(ies), min-sites is {cfg.min_sites}; "
                f"errors: {ex.errors or 'none'}; no answer: {ex.timeouts or 'none'}"
            )
        return out

    def _stage_aggregate(
        self, rs: RoundState, replies: Replies, sel: Selection, rnd: int, result: Result
    ) -> None:
        """c. The sites' ensemble on the whole pool (weighted by training-set size), kept per site
        for next round's targets; in weights/hybrid exchange FedAvg of the weights, and in weights
        exchange the averaged model plays the ensemble and is distilled towards the FM on S_r."""
        if rs.weights_mode:  # FedAvg over the weights alone (hybrid replies also carry probabilities)
            rs.arrays = aggregate_arrayrecords(
                [
                    RecordDict(
                        {
                            P.KEY_ARRAYS: r.content.array_records[P.KEY_ARRAYS],
                            P.KEY_METRICS: r.content.metric_records[P.KEY_METRICS],
                        }
                    )
                    for r in replies.valid
                ],
                P.MET_NUM_EXAMPLES,
            )
            result.arrays = rs.arrays
        if replies.probs:  # logits / hybrid: every site answered on the whole pool
            rs.site_probs.update(replies.probs)
            rs.site_counts.update({s: replies.counts[s] for s in replies.probs})
            ens = ensemble_of(replies.probs, replies.counts)
        else:  # weights: the averaged model plays the ensemble
            server_model = self._server_model(rs.arrays)
            ens = self._model_probs(server_model, rs.pool_images)
            if self.cfg.exchange == "weights":
                idx = sel.idx
                rs.arrays = self._distill_server_model(
                    server_model, rs.pool_images[idx], rs.pool_masks[idx], sel.fm_probs[idx], rnd
                )
                result.arrays = rs.arrays
        rs.ensemble[:] = ens
        rs.known[:] = True

    def _stage_teacher(self, rs: RoundState, sel: Selection, rnd: int) -> float:
        """c. Sites -> FM: the decoder trains on every pool mask, with KL towards the ensemble on S_r."""
        return rs.teacher.distill(
            np.arange(len(rs.pool)), rs.ensemble, self.weights, self.cfg.fm_epochs, seed=rnd, kd_gate=sel.gate
        )

    def _stage_round_files(self, rs: RoundState, rnd: int) -> None:
        self.rundir.save_checkpoint(
            "fm_decoder_latest.pt", rs.teacher.decoder_state(), {"round": rnd, "fm": self.cfg.fm}
        )
        if rs.weights_mode:
            self.rundir.save_checkpoint(
                f"global_round_{rnd:03d}.pt",
                from_array_record(rs.arrays),
                {"round": rnd, "model": self.cfg.model},
            )
        self._plot()

    def _finish(self, rs: RoundState, completed: int, num_rounds: int) -> None:
        """After the last round: the newcomer bootstraps (logits), the final test, checkpoints, summary."""
        cfg = self.cfg
        bootstrap = None
        if self.holdout_node is not None and not rs.weights_mode:
            bootstrap = self._bootstrap_holdout(
                rs.pool, rs.teacher, rs.has_pool, num_rounds, rs.site_probs, rs.site_counts
            )
        final, holdout = self._final_evaluation(rs.arrays, num_rounds)
        if holdout is not None and bootstrap is not None:
            holdout["bootstrap"] = bootstrap
        self.rundir.save_checkpoint(
            "fm_decoder_final.pt", rs.teacher.decoder_state(), {"round": completed, "fm": cfg.fm}
        )
        if rs.weights_mode:
            self.rundir.save_checkpoint("global_final.pt", from_array_record(rs.arrays), {"round": completed})
        pool = rs.pool
        self.summary_data = {
            **self._summary(completed, final, rs.initial_test, holdout, self.t_run),
            "exchange": cfg.exchange,
            "site_models": {s: p.get("model") for s, p in self.profiles.items()},
            "site_model_params": {s: p.get("model-params") for s, p in self.profiles.items()},
            "fm": cfg.fm,
            "fm_params": rs.fm.num_parameters(),
            "fm_embed_seconds": rs.teacher.embed_seconds,
            "pool": {
                "id": pool.pool_id,
                "size": len(pool),
                "source": pool.meta.get("source"),
                "generators": pool.meta.get("generators"),
                # sites whose generator was refused (e.g. by their policy) or rejected, and why
                "generator_errors": pool.meta.get("generator_errors", {}),
                "fallback": pool.meta.get("fallback"),
                "score": rs.pool_score,
            },
        }
