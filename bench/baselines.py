"""The two methods that are not federated, on the same SiteTrainer the ClientApp uses.

``local``: every training site trains its own model on its own data alone.
``central``: one model trained on the pooled training data of all training sites (upper bound).
Both train ``num-rounds x local-epochs`` epochs, in blocks of ``local-epochs`` with the same
per-round seeds and learning-rate schedule as the federated sites, keep their AdamW state across
blocks (as every federated site does), validate every ``evaluate-every`` blocks (the Dice curve)
and count their optimiser steps: ``local`` per site, ``central`` in all (= the sum of the sites'
steps for the same epochs).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from client_app.trainer import SiteTrainer, TrainSettings
from common.config import NodeConfig, RunConfig
from common.runtime import resolve_device
from common.sites import load_site


def _trainers(cfg: RunConfig, num_sites: int) -> tuple[list[SiteTrainer], SiteTrainer | None]:
    device = resolve_device(cfg.device)
    train, holdout = [], None
    for k in range(num_sites):
        site, split = load_site(cfg, NodeConfig(partition_id=k, num_partitions=num_sites))
        torch.manual_seed(cfg.seed)  # as a ClientApp builds its initial model
        tr = SiteTrainer(site, split, cfg.model, device)
        if site.name == cfg.holdout_site:
            holdout = tr
        else:
            train.append(tr)
    return train, holdout


def _mean(scores: dict[str, dict], key: str) -> float | None:
    vals = [s[key] for s in scores.values() if s["n"] > 0 and np.isfinite(s[key])]
    return float(np.mean(vals)) if vals else None


def _point(rnd: int, scores: dict[str, dict]) -> dict:
    return {"round": rnd, "dice_mean": _mean(scores, "dice"), "dice05_mean": _mean(scores, "dice05")}


def _due(cfg: RunConfig, rnd: int) -> bool:
    return rnd % cfg.evaluate_every == 0 or rnd == cfg.num_rounds


def run_local(cfg: RunConfig, num_sites: int) -> dict:
    t0 = time.time()
    trainers, holdout = _trainers(cfg, num_sites)
    steps = {t.site.name: 0 for t in trainers}
    curve = [_point(0, {t.site.name: t.evaluate("val") for t in trainers})]
    for rnd in range(1, cfg.num_rounds + 1):
        for tr in trainers:
            steps[tr.site.name] += int(tr.train(TrainSettings.from_run(cfg, rnd))["steps"])
        if _due(cfg, rnd):
            curve.append(_point(rnd, {t.site.name: t.evaluate("val") for t in trainers}))
    test = {t.site.name: t.evaluate("test") for t in trainers}
    return {
        "test": test,
        # a site that never trains has no model of its own: leave-one-site-out does not apply
        "holdout": None if holdout is None else {"site": holdout.site.name, "dice": None, "iou": None},
        "curve": curve,
        "steps_private_per_site": steps,
        "seconds": time.time() - t0,
    }


def run_central(cfg: RunConfig, num_sites: int) -> dict:
    t0 = time.time()
    trainers, holdout = _trainers(cfg, num_sites)
    pooled = [t.site.subset(t.split["train"]) for t in trainers]
    images = np.concatenate([p[0] for p in pooled])
    masks = np.concatenate([p[1] for p in pooled])
    central = trainers[0]  # its model is the central model; the others only evaluate it

    def scores(split: str) -> dict[str, dict]:
        weights = central.get_weights()
        out = {}
        for tr in trainers:
            tr.set_weights(weights)
            out[tr.site.name] = tr.evaluate(split)
        return out

    curve = [_point(0, scores("val"))]
    steps = 0
    for rnd in range(1, cfg.num_rounds + 1):
        steps += int(central.train(TrainSettings.from_run(cfg, rnd), images, masks)["steps"])
        if _due(cfg, rnd):
            curve.append(_point(rnd, scores("val")))
    test = scores("test")
    hold = None
    if holdout is not None:
        holdout.set_weights(central.get_weights())
        hold = {"site": holdout.site.name, **holdout.evaluate("all")}
    return {
        "test": test,
        "holdout": hold,
        "curve": curve,
        "steps_private_per_site": {"pooled": steps},
        "seconds": time.time() - t0,
    }
