"""The held-out hospital in logits exchange (after the last round): it joins as a newcomer would.

A mixin of :class:`server_app.dsfedmed.DSFedMedStrategy`: it uses ``cfg``, ``fed``, ``holdout_node``
and the reply checks of :class:`server_app.fedavg.DeadlineFedAvg`."""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from common import protocol as P
from common.codec import encode_probs, to_array_record
from server_app.synthesis import Pool
from server_app.targets import site_targets
from server_app.teacher import FoundationTeacher

log = logging.getLogger("dsfedmed.server")


class HoldoutBootstrap:
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
