"""The synthetic pool stage of a DSFedMed run: built (from the sites' generators, phantoms or a
folder), reused from pool-dir when its key matches, resumed from the run directory, and scored by
the sites (a model trained on the pool alone against as many real images, cached beside the pool).

A mixin of :class:`server_app.dsfedmed.DSFedMedStrategy`: it reads the strategy's ``cfg``, ``fed``
(the federation), ``rundir``, ``train_nodes`` and ``pool_seed``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from common import protocol as P
from common.codec import check_weights_record, to_array_record
from common.fileio import atomic_write_text
from common.generator import build_unet, generator_config_from_run
from common.validation import PayloadInvalid, check_metrics, check_pool
from server_app.checkpoint import ResumeError
from server_app.federation import FederationStopped
from server_app.synthesis import Pool, contact_sheet, folder_pool, generator_pool, phantom_pool

log = logging.getLogger("dsfedmed.server")


class PoolStage:
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
