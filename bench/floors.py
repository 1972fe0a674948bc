"""Floors: what a model that learned nothing scores on the benchmark's own splits and metric.

- ``untrained``: the site model at each seed's initialisation (as every method starts);
- ``all-foreground`` / ``all-background``: a constant prediction (probability 1 / 0 everywhere);
- ``fm-zero-shot``: the FM prompt-free (whole-image box), decoder as shipped: the reference an
  FM-using method must beat (not a floor of the site model);
- ``oracle-fm-mask-box``: the FM prompted with the box of the *true* mask; it uses the answer, so
  it is reported apart and never counted as a floor.

The *best floor* is the highest of untrained, all-foreground and all-background (Dice@0.5, mean of
the sites' test splits). Every score goes through :class:`common.metrics.ThresholdedScores`, the
code the sites evaluate with; sites are scored on their test split, the held-out hospital on all
its pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from common.config import NodeConfig, RunConfig
from common.data import SiteArrays, default_cache_dir
from common.metrics import ThresholdedScores
from common.models import build_model
from common.sites import load_site
from common.splits import Split

FLOOR_NAMES = ("untrained", "all-foreground", "all-background")
REFERENCE_NAMES = ("fm-zero-shot",)
ORACLE_NAMES = ("oracle-fm-mask-box",)


def score_probs(probs: torch.Tensor, masks: np.ndarray) -> dict[str, float]:
    sc = ThresholdedScores()
    sc.update(probs, torch.from_numpy(masks.astype(np.float32)))
    return sc.result()


def constant_scores(masks: np.ndarray, value: float) -> dict[str, float]:
    """A prediction of ``value`` everywhere (1: all foreground, 0: all background)."""
    return score_probs(torch.full(masks.shape, float(value)), masks)


@torch.no_grad()
def model_probs(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    model.eval()
    out = [
        torch.sigmoid(model(torch.from_numpy(images[i : i + batch_size].astype(np.float32) / 255.0)))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def _eval_part(site: SiteArrays, split: Split, holdout: bool) -> tuple[np.ndarray, np.ndarray]:
    idx = sorted(split["train"] + split["val"] + split["test"]) if holdout else split["test"]
    return site.subset(idx)


def _summarise(per_site: dict[str, dict], holdout_site: str) -> dict:
    test = {s: v for s, v in per_site.items() if s != holdout_site}
    out: dict = {"test": test, "holdout": per_site.get(holdout_site)}
    for k in ("dice05", "iou05", "dice", "iou"):
        vals = [v[k] for v in test.values() if v["n"]]
        out[f"{k}_test_mean"] = float(np.mean(vals)) if vals else None
        hold = per_site.get(holdout_site)
        out[f"{k}_holdout"] = hold[k] if hold else None
    out["dice05_test_per_site"] = {s: v["dice05"] for s, v in test.items()}
    return out


def _mean_over_seeds(runs: list[dict[str, dict]]) -> dict[str, dict]:
    sites = runs[0].keys()
    return {
        s: {
            **{k: float(np.mean([r[s][k] for r in runs])) for k in ("dice", "iou", "dice05", "iou05")},
            "n": runs[0][s]["n"],
        }
        for s in sites
    }


def eval_parts(cfg: RunConfig, num_sites: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each site's scored pairs: a training site's test split, the held-out site's every pair."""
    parts = {}
    for k in range(num_sites):
        site, split = load_site(cfg, NodeConfig(partition_id=k, num_partitions=num_sites))
        parts[site.name] = _eval_part(site, split, site.name == cfg.holdout_site)
    return parts


def fm_decoder_scores(
    cfg: RunConfig,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    decoder: dict[str, np.ndarray] | None = None,
    log: Callable[[str], None] = print,
    cache_root=None,
) -> dict:
    """The FM (prompt-free, whole-image box) on the benchmark's splits, with its shipped decoder or
    with ``decoder`` (a DSFedMed run's adapted or final decoder): the teacher measured where the
    benchmark has the labels (a deployment does not need this)."""
    from common.fm_cache import EmbeddingCache
    from common.foundation import fm_checkpoint_id, load_foundation_model

    fm = load_foundation_model(cfg.fm, cfg.fm_checkpoint, "cpu", expected_sha256=cfg.fm_checkpoint_sha256)
    if decoder is not None:
        fm.decoder.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in decoder.items()})
    cache = EmbeddingCache(
        cache_root or default_cache_dir() / "fm-embeddings",
        cfg.fm,
        fm_checkpoint_id(cfg.fm_checkpoint),
        fm.spec.input_size,
    )
    per_site = {}
    for s, (images, masks) in parts.items():
        emb = cache.embeddings(fm, images)
        with torch.no_grad():
            logits = fm.decode(emb, fm.prompts(len(images), "whole-box", None), images.shape[-1])
        per_site[s] = score_probs(torch.sigmoid(logits), masks)
    return _summarise(per_site, cfg.holdout_site)


def compute_floors(
    cfg: RunConfig,
    num_sites: int,
    seeds: tuple[int, ...],
    with_fm: bool = True,
    log: Callable[[str], None] = print,
    cache_root=None,
) -> dict:
    sites = []
    for k in range(num_sites):
        site, split = load_site(cfg, NodeConfig(partition_id=k, num_partitions=num_sites))
        sites.append((site, split, site.name == cfg.holdout_site))
    parts = {site.name: _eval_part(site, split, hold) for site, split, hold in sites}
    in_ch = sites[0][0].images.shape[1]

    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)  # as a site builds its initial model
        model = build_model(cfg.model, in_channels=in_ch)
        per_seed.append({s: score_probs(model_probs(model, im), m) for s, (im, m) in parts.items()})
    untrained = _summarise(_mean_over_seeds(per_seed), cfg.holdout_site)
    untrained["per_seed_dice05_test_mean"] = {
        str(seed): _summarise(r, cfg.holdout_site)["dice05_test_mean"]
        for seed, r in zip(seeds, per_seed, strict=True)
    }
    out: dict = {
        "untrained": untrained,
        "all-foreground": _summarise(
            {s: constant_scores(m, 1.0) for s, (_, m) in parts.items()}, cfg.holdout_site
        ),
        "all-background": _summarise(
            {s: constant_scores(m, 0.0) for s, (_, m) in parts.items()}, cfg.holdout_site
        ),
    }
    best = max(FLOOR_NAMES, key=lambda n: out[n]["dice05_test_mean"] or 0.0)
    out["best_floor"] = {"name": best, "dice05_test_mean": out[best]["dice05_test_mean"]}
    if with_fm:
        out.update(_fm_rows(cfg, parts, log, cache_root))
    return out


def _fm_rows(cfg: RunConfig, parts: dict, log: Callable[[str], None], cache_root) -> dict:
    from common.fm_cache import EmbeddingCache
    from common.foundation import fm_checkpoint_id, load_foundation_model

    fm = load_foundation_model(cfg.fm, cfg.fm_checkpoint, "cpu", expected_sha256=cfg.fm_checkpoint_sha256)
    cache = EmbeddingCache(
        cache_root or default_cache_dir() / "fm-embeddings",
        cfg.fm,
        fm_checkpoint_id(cfg.fm_checkpoint),
        fm.spec.input_size,
    )
    zero, oracle = {}, {}
    for s, (images, masks) in parts.items():
        log(f"FM on {s}: {len(images)} images (embeddings cached in {cache.root})")
        emb = cache.embeddings(
            fm, images, progress=lambda d, t, s=s: log(f"  {s}: embedded {d}/{t}") if d % 40 == 0 else None
        )
        m = torch.from_numpy(masks.astype(np.float32))
        with torch.no_grad():
            whole = fm.decode(emb, fm.prompts(len(images), "whole-box", None), images.shape[-1])
            boxed = fm.decode(emb, fm.prompts(len(images), "oracle-mask-box", m), images.shape[-1])
        zero[s] = score_probs(torch.sigmoid(whole), masks)
        oracle[s] = score_probs(torch.sigmoid(boxed), masks)
    return {
        "fm-zero-shot": {
            **_summarise(zero, cfg.holdout_site),
            "how": f"{cfg.fm}, whole-image box prompt, decoder as shipped, frozen-encoder embeddings",
        },
        "oracle-fm-mask-box": {
            **_summarise(oracle, cfg.holdout_site),
            "how": "the FM prompted with the box of the true mask: uses the answer, never a floor",
        },
        "fm_embed_seconds": cache.seconds,
        "fm_embedded_images": cache.computed,
    }
