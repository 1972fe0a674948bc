"""DSFedMed: mutual distillation between the server's foundation model and the sites' models.

Round r (see common/protocol.py for the records):
  a. the FM scores the synthetic pool from cached embeddings; learnability-guided selection picks
     S_r using the sites' latest ensemble probabilities (FM term only before any exist);
  b. ``train``: sites get S_r's images (or the whole pool once, cached at the site, whichever
     costs fewer bytes over the run) and the FM's soft targets; they train on private data plus
     distillation on S_r and reply with their probabilities on S_r (``logits``), their weights
     (``weights``), or both (``hybrid``);
  c. the server averages site probabilities into the ensemble (weighted by training-set size) —
     in ``weights`` mode the ensemble is the FedAvg model's output on S_r, and that model is also
     distilled towards the FM on the server before it is broadcast (the paper's exchange) — and
     updates the FM's mask decoder towards the ensemble plus the synthetic masks;
  d. ``evaluate``: sites report Dice/IoU of their model on their validation split.

Selection needs ensemble probabilities for every candidate, but sites only answer on S_r: a sample
not yet seen by the sites is scored with the ensemble taken equal to the FM (zero disagreement),
so it competes on the FM-fit term alone until it has been selected once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.result import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import protocol as P
from common.codec import encode_probs, from_array_record, to_array_record
from common.fileio import atomic_write_text
from common.foundation import fm_checkpoint_id, load_foundation_model
from common.generator import build_unet, generator_config_from_run
from common.losses import DistillWeights, distillation_loss
from common.models import build_model, load_weights
from common.runtime import resolve_device
from common.transforms import resize_pairs, to_float_batch
from common.validation import (
    PayloadInvalid,
    check_metrics,
    check_pool,
    check_probs_record,
    check_weights_record,
)
from server_app.checkpoint import ResumeError
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import FederationStopped
from server_app.round_state import Replies, RoundState, Selection
from server_app.selection import SelectionConfig, select
from server_app.synthesis import Pool, contact_sheet, folder_pool, generator_pool, phantom_pool
from server_app.targets import ensemble as ensemble_of
from server_app.targets import site_targets
from server_app.teacher import FoundationTeacher

log = logging.getLogger("dsfedmed.server")


class DSFedMedStrategy(DeadlineFedAvg):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.require_same_model = self.cfg.exchange != "logits"
        self.device = resolve_device(self.cfg.device)
        self.weights = DistillWeights(
            self.cfg.sup_weight, self.cfg.kd_weight, self.cfg.temperature, self.cfg.pos_weight
        )
        self.pool_seed = self.cfg.pool_seed if self.cfg.pool_seed >= 0 else self.cfg.seed

    # --- pool ----------------------------------------------------------------------------------
    def _pool_key(self) -> dict:
        cfg = self.cfg
        key = {
            "source": cfg.pool_source,
            "size": cfg.pool_size,
            "image_size": cfg.image_size,
            "seed": self.pool_seed,
        }
        if cfg.pool_source == "generator":
            key["generator"] = {
                "size": cfg.gen_size,
                "steps": cfg.gen_steps,
                "seconds": cfg.gen_seconds,
                "batch": cfg.gen_batch_size,
                "sample_steps": cfg.gen_sample_steps,
            }
            key["sites"] = sorted(self.fed.site_of(n) for n in self.train_nodes)
            # the generators train on the sites' training splits: a pool made from one split is never
            # reused with another (that could leak another split's test images into the pool)
            # the data by name and the split by content: the same pool is recognised from another
            # checkout or folder (the benchmark's worktrees), never across different splits
            split_path = Path(cfg.split_file).expanduser() if cfg.split_file else None
            key["data"] = {
                "data_root": Path(cfg.data_root).name if cfg.data_root else "",
                "split": hashlib.sha256(split_path.read_bytes()).hexdigest()
                if split_path is not None and split_path.is_file()
                else cfg.split_file,
                "split_seed": None if cfg.split_file else cfg.seed,
                "fractions": [cfg.val_fraction, cfg.test_fraction],
                "group_regex": cfg.split_group_regex,
                "phantom_images_per_site": None if cfg.data_root else cfg.phantom_images_per_site,
            }
        if cfg.pool_source == "folder":
            key["folder"] = str(Path(cfg.pool_folder).resolve())
        return key

    def build_pool(self) -> Pool:
        cfg, key = self.cfg, self._pool_key()
        cached = Path(cfg.pool_dir).expanduser() / "pool.npz" if cfg.pool_dir else None
        if cached is not None and cached.is_file():
            pool = Pool.load(cached)
            try:  # a cached pool is what every site will be sent: it must fit the protocol
                check_pool(pool.images, pool.masks, max_n=cfg.pool_size, what=f"pool in {cached}")
            except PayloadInvalid as exc:
                log.warning("%s; building a new one", exc)
                pool.meta["key"] = None
            if pool.meta.get("key") == key:
                log.info("reusing synthetic pool %s (%d samples) from %s", pool.pool_id, len(pool), cached)
                self._write_pool(pool)
                return pool
            log.info("pool in %s was made with other settings; building a new one", cached)
        if cfg.pool_source == "phantoms":
            pool = phantom_pool(cfg.pool_size, cfg.image_size, self.pool_seed)
        elif cfg.pool_source == "folder":
            if not cfg.pool_folder:
                raise FederationStopped("pool-source 'folder' needs run config 'pool-folder'")
            pool = folder_pool(cfg.pool_folder, cfg.pool_size, cfg.image_size, self.pool_seed)
        else:
            pool = self._generator_pool()
        pool.meta["key"] = key
        self._write_pool(pool)
        if cached is not None and "fallback" not in pool.meta:  # a stand-in pool is never reused
            pool.save(cached)
        return pool

    def _generator_pool(self) -> Pool:
        cfg, fed = self.cfg, self.fed
        gcfg = generator_config_from_run(cfg)
        reference = {k: tuple(v.shape) for k, v in build_unet(gcfg).state_dict().items()}
        msgs = [
            fed.make(n, P.MSG_TRAIN_GENERATOR, RecordDict({P.KEY_CONFIG: ConfigRecord({})}), 0)
            for n in self.train_nodes
        ]
        log.info(
            "sites train their diffusion generators (%d steps or %.0f s)", gcfg.train_steps, gcfg.max_seconds
        )
        ex = fed.send(msgs, cfg.round_timeout_s + gcfg.max_seconds)
        gens: dict[str, tuple[dict, dict]] = {}
        for site, rep in ex.replies.items():
            try:
                state, stats = self._validate_generator(rep, reference)
            except PayloadInvalid as exc:
                ex.errors[site] = f"rejected generator: {exc}"
                log.warning("site %s: %s", site, ex.errors[site])
                continue
            gens[site] = (state, stats)
        if not gens:
            why = f"no usable generator from any site (errors: {ex.errors or 'none'}; no answer: {ex.timeouts or 'none'})"
            if cfg.pool_fallback == "stop" or (cfg.pool_fallback == "folder" and not cfg.pool_folder):
                raise FederationStopped(f"{why}; use pool-source 'phantoms' or 'folder' instead")
            log.warning("%s: the pool comes from pool-fallback '%s' instead", why, cfg.pool_fallback)
            if cfg.pool_fallback == "folder":
                pool = folder_pool(cfg.pool_folder, cfg.pool_size, cfg.image_size, self.pool_seed)
            else:
                pool = phantom_pool(cfg.pool_size, cfg.gen_size, self.pool_seed)
            pool.meta.update(fallback=cfg.pool_fallback, fallback_reason=why, generator_errors=ex.errors)
            return pool
        t0 = time.time()
        pool = generator_pool(gens, gcfg, cfg.pool_size, self.pool_seed, self.device)
        pool.meta["generators"] = {s: st for s, (_, st) in gens.items()}
        pool.meta["sample_seconds"] = time.time() - t0
        pool.meta["generator_errors"] = ex.errors
        log.info(
            "sampled %d synthetic pairs from %d site generator(s) in %.0f s",
            len(pool),
            len(gens),
            time.time() - t0,
        )
        return pool

    @staticmethod
    def _validate_generator(rep, reference: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
        """A generator reply's weights (the agreed generator's size, keys, shapes, finite) and stats
        (finite mask statistics, std >= 0), or :class:`PayloadInvalid` saying what is wrong."""
        state = check_weights_record(
            rep.content.array_records.get(P.KEY_GENERATOR), reference, "the agreed generator", P.KEY_GENERATOR
        )
        stats = rep.content.config_records.get(P.KEY_GEN_STATS)
        keys = ("mask_log_fg_mean", "mask_log_fg_std")
        check_metrics(stats, keys, nonnegative=keys[1:], what=P.KEY_GEN_STATS)
        return state, dict(stats)

    def _resumed_pool(self, pool_id: str) -> Pool:
        """The interrupted run's pool, from its run directory (never made again: a generator pool
        is not reproducible without the sites' generators, and the sites hold it by id)."""
        path = self.rundir.path / "pool.npz"
        if not path.is_file():
            raise ResumeError(f"resume-from {self.rundir.path}: pool.npz is missing; the run cannot continue")
        pool = Pool.load(path)
        if pool.pool_id != pool_id:
            raise ResumeError(
                f"resume-from {self.rundir.path}: pool.npz holds pool {pool.pool_id}, the checkpoint pool {pool_id}"
            )
        log.info("resumed synthetic pool %s (%d samples) from %s", pool_id, len(pool), path)
        return pool

    def _write_pool(self, pool: Pool) -> None:
        pool.save(self.rundir.path / "pool.npz")
        try:
            contact_sheet(pool, self.rundir.path / "pool.png")
        except Exception as exc:  # noqa: BLE001 - a picture must not stop the federation
            log.warning("could not draw pool.png: %s", exc)

    def score_pool(self, pool: Pool, has_pool: set[int]) -> dict | None:
        """Ask every site how a model trained on the pool alone does on its real validation data,
        against as many real images (the pool is cached at the sites, so round 1 need not resend it)."""
        if self.cfg.pool_score_epochs <= 0:
            return None
        sites = {self.fed.site_of(n) for n in self.train_nodes}
        cached = self._cached_pool_score(pool, sites)
        if cached is not None:
            return cached
        conf = ConfigRecord({P.CFG_POOL_ID: pool.pool_id})
        rec = RecordDict(
            {
                P.KEY_CONFIG: conf,
                P.KEY_POOL: to_array_record({P.ARR_IMAGES: pool.images, P.ARR_MASKS: pool.masks}),
            }
        )
        ex = self.fed.send(
            [self.fed.make(n, P.MSG_EVALUATE_POOL, rec, 0) for n in self.train_nodes],
            self.cfg.round_timeout_s,
        )
        per_site = {}
        for site, rep in ex.replies.items():
            m = rep.content.metric_records.get(P.KEY_METRICS)
            try:
                check_metrics(m, ("dice-pool", "dice-real"), unit=("dice-pool", "dice-real"))
            except PayloadInvalid as exc:
                ex.errors[site] = f"rejected pool score: {exc}"
                continue
            per_site[site] = {k.replace("-", "_"): float(v) for k, v in m.items()}
            has_pool.add(rep.metadata.src_node_id)
        for site, reason in ex.errors.items():
            log.warning("site %s could not score the pool: %s", site, reason)
        pool_d = [v["dice_pool"] for v in per_site.values()]
        real_d = [v["dice_real"] for v in per_site.values()]
        score = {
            "epochs": self.cfg.pool_score_epochs,
            "sites": per_site,
            "dice_pool_mean": float(np.mean(pool_d)) if pool_d else None,
            "dice_real_mean": float(np.mean(real_d)) if real_d else None,
            "errors": ex.errors,
        }
        self.rundir.write_json("pool_score.json", score)
        cache = self._pool_score_path(pool)
        if cache is not None and set(per_site) == sites and not ex.errors:
            atomic_write_text(cache, json.dumps(score, indent=1))  # a property of this pool: reused
        if pool_d:
            log.info(
                "pool quality: a site model trained on the pool alone reaches validation Dice %.3f "
                "(on as many real images: %.3f)",
                score["dice_pool_mean"],
                score["dice_real_mean"],
            )
        return score

    def _pool_score_path(self, pool: Pool) -> Path | None:
        cfg = self.cfg
        if not cfg.pool_dir:
            return None
        return Path(cfg.pool_dir).expanduser() / f"pool_score-{pool.pool_id}-e{cfg.pool_score_epochs}.json"

    def _cached_pool_score(self, pool: Pool, sites: set[str]) -> dict | None:
        """The pool's quality as scored once by the same sites for the same pool and epochs (kept in
        pool-dir beside the pool), so runs that reuse the pool do not pay the scoring again."""
        path = self._pool_score_path(pool)
        if path is None or not path.is_file():
            return None
        try:
            score = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(score, dict) or set(score.get("sites") or {}) != sites:
            return None
        score["reused_from"] = path.name
        self.rundir.write_json("pool_score.json", score)
        log.info("pool quality reused from %s (scored by the same sites when the pool was made)", path)
        return score

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

    def _server_model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The averaged site model, materialised on the server (weights exchange only)."""
        model = build_model(self.cfg.model)
        load_weights(model, from_array_record(arrays), self.cfg.model)
        return model

    def _model_probs(self, model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
        """The model's probabilities at ``logit-size``: what sites would have sent in logits mode."""
        model.eval()
        with torch.no_grad():
            p = torch.sigmoid(model(to_float_batch(images)))
        return F.interpolate(p, size=(self.cfg.logit_size,) * 2, mode="area")

    def _distill_server_model(self, model: torch.nn.Module, images, masks, fm_probs, rnd) -> ArrayRecord:
        """The paper's server-side step: the averaged site model learns from the FM on S_r."""
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=self.cfg.learning_rate)
        gen = torch.Generator().manual_seed(rnd)
        x_all, m_all = to_float_batch(images), torch.from_numpy(masks).float()
        for _ in range(max(1, self.cfg.fm_epochs)):
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order), self.cfg.batch_size):
                b = order[i : i + self.cfg.batch_size]
                if len(b) < 2:
                    continue
                loss = distillation_loss(model(x_all[b]), m_all[b], fm_probs[b], self.weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return to_array_record({k: v.detach().numpy() for k, v in model.state_dict().items()})

    def _bootstrap_holdout(
        self,
        pool: Pool,
        teacher: FoundationTeacher,
        has_pool: set[int],
        rnd: int,
        site_probs: dict[str, torch.Tensor],
        site_counts: dict[str, float],
    ) -> dict:
        """Logits exchange: the held-out site has no model of its own yet. It gets what a hospital
        joining the federation would get (the synthetic pool and the run's final targets on all of
        it: the final FM mixed with every site's last answers, server_app/targets.py) and trains its
        site model on those alone; its own labels are only used to test it."""
        cfg, node = self.cfg, self.holdout_node
        idx = np.arange(len(pool))
        final = site_targets(
            teacher.probs(None, cfg.logit_size),
            site_probs,
            site_counts,
            cfg.holdout_site,
            cfg.target_fm_weight,
        )
        soft = encode_probs(final, cfg.logit_size, cfg.logit_dtype)
        conf = {
            P.CFG_ROUND: rnd,
            P.CFG_STAGE: P.STAGE_BOOTSTRAP,
            P.CFG_POOL_ID: pool.pool_id,
            P.CFG_SELECTED: [int(i) for i in idx],
            P.CFG_EXCHANGE: cfg.exchange,
            P.CFG_MODEL: cfg.model,
            P.CFG_POOL_INCLUDED: "none" if node in has_pool else "all",
        }
        rec = RecordDict({P.KEY_SOFT: to_array_record({P.ARR_PROBS: soft}), P.KEY_CONFIG: ConfigRecord(conf)})
        if node not in has_pool:
            rec[P.KEY_POOL] = to_array_record({P.ARR_IMAGES: pool.images, P.ARR_MASKS: pool.masks})
        ex = self.fed.send([self.fed.make(node, P.MSG_TRAIN, rec, rnd)], cfg.round_timeout_s)
        site = cfg.holdout_site
        if site in ex.replies and not self.validate_metrics(ex.replies[site]):
            log.info("held-out site %s trained its model on the %d-sample pool and the FM", site, len(idx))
            return {"status": "trained", "samples": len(idx), "epochs": cfg.holdout_epochs}
        reason = ex.errors.get(site) or ("no answer" if site in ex.timeouts else "reply without metrics")
        log.warning("held-out site %s could not bootstrap: %s", site, reason)
        return {"status": "failed", "reason": reason}

    # --- the run: setup, then a short loop over named stages ----------------------------------
    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float, **_: object
    ) -> Result:
        cfg = self.cfg
        self.t_run = time.time()
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
        completed = first - 1
        for rnd in range(first, num_rounds + 1):
            t0, before = time.time(), (dict(self.fed.traffic.down), dict(self.fed.traffic.up))
            self.fed.progress.round(rnd, num_rounds)
            sel = self._stage_select(rs, sel_cfg)  # a. score every pool sample, select S_r
            ex = self.fed.send(self._stage_train_messages(rs, sel, rnd), timeout)  # b. sites train
            replies = self._stage_accept(rs, ex, rnd)  # b. validated replies only
            self._stage_aggregate(rs, replies, sel, rnd, result)  # c. ensemble (or FedAvg)
            fm_loss = self._stage_teacher(rs, sel, rnd)  # c. sites -> FM
            ev = self._evaluate_round(rs.arrays, rnd, num_rounds)  # d. validation
            scores = self._scores(ev)
            self._record_validation(result, rnd, scores)
            extra = {
                "selection": sel.stats,
                "selected": [int(i) for i in sel.idx],
                "fm_distill_loss": fm_loss,
                "pool_sent_whole": True,
            }
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
        self.rundir.save_checkpoint(
            "fm_decoder_adapted.pt", rs.teacher.decoder_state(), {"round": 0, "fm": cfg.fm}
        )
        ev = self._evaluate(rs.arrays, 0, "val", self.train_nodes)
        rs.initial_test = self._scores(self._evaluate(rs.arrays, 0, "test", self.train_nodes))
        extra = {
            "pool_id": rs.pool.pool_id,
            "pool_size": len(rs.pool),
            "pool_score": rs.pool_score,
            "fm_adapt_loss": adapt_loss,
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

    def _stage_train_messages(self, rs: RoundState, sel: Selection, rnd: int) -> list:
        """b. One train message per available site: the whole pool the first time (then by id),
        its own targets on S_r (FM mixed with the *other* sites' answers), and in weights/hybrid
        exchange the global site model."""
        cfg, fed = self.cfg, self.fed
        nodes = fed.wait_for_nodes(cfg.min_sites, cfg.sampling_deadline_s, among=self.train_nodes)
        nodes = fed.sample(nodes, cfg.sites_per_round, rnd, cfg.seed)  # partial participation
        msgs = []
        for n in nodes:
            tgt = site_targets(
                sel.fm_probs, rs.site_probs, rs.site_counts, fed.site_of(n), cfg.target_fm_weight
            )
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
            rec[P.KEY_CONFIG] = ConfigRecord(conf)
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
