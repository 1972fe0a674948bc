"""Learnability-guided selection of synthetic samples (DSFedMed).

Paper rule (``paper``): score each sample i by
    s_i = lambda * (-L_GT(FM, i)) + (1 - lambda) * (KL(p_FM || p_E) + KL(p_E || p_FM))
with E the sites' ensemble from the previous round, and keep the top fraction rho. Samples the FM
already fits (low supervised loss) and on which FM and sites disagree (high symmetric KL) carry
the most transferable knowledge. Before any site logits exist, only the FM term counts.

Official-code rule (``quantile``): keep the samples whose teacher (FM) and student (ensemble)
supervised losses are both below their ``q`` quantile (default 0.7), then the top 50% of those by
summed KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.losses import binary_kl, supervised_bce


@dataclass(frozen=True)
class SelectionConfig:
    rule: str = "paper"  # "paper" | "quantile" | "all"
    lam: float = 0.5
    rho: float = 0.5
    quantile: float = 0.7
    kl_keep: float = 0.5
    pos_weight: float = 2.0


def per_sample_bce(logits: torch.Tensor, masks: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return torch.stack(
        [supervised_bce(logits[i : i + 1], masks[i : i + 1], pos_weight) for i in range(len(logits))]
    )


def symmetric_kl(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over pixels of KL(a||b) + KL(b||a)."""
    dims = tuple(range(1, p_a.ndim))
    return binary_kl(p_a, p_b, dims) + binary_kl(p_b, p_a, dims)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def select(
    fm_probs: torch.Tensor,
    masks: torch.Tensor,
    ensemble_probs: torch.Tensor | None,
    cfg: SelectionConfig,
) -> tuple[np.ndarray, dict]:
    """Indices of the selected samples (sorted) and statistics for the run log.

    All inputs are (N,1,S,S) at the same resolution; ``masks`` are {0,1}.
    """
    n = fm_probs.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), {"n_candidates": 0, "n_selected": 0}
    l_fm = per_sample_bce(_logit(fm_probs), masks, cfg.pos_weight)
    kl = symmetric_kl(fm_probs, ensemble_probs) if ensemble_probs is not None else torch.zeros(n)
    stats: dict = {"rule": cfg.rule, "n_candidates": n, "fm_only": ensemble_probs is None}
    if cfg.rule == "all":
        idx = np.arange(n)
    elif cfg.rule == "paper" or ensemble_probs is None:
        lam = cfg.lam if ensemble_probs is not None else 1.0
        score = lam * (-l_fm) + (1 - lam) * kl
        k = max(1, int(round(cfg.rho * n)))
        idx = np.sort(torch.argsort(score, descending=True)[:k].numpy())
        stats["score_mean_selected"] = float(score[idx].mean())
    elif cfg.rule == "quantile":
        l_e = per_sample_bce(_logit(ensemble_probs), masks, cfg.pos_weight)
        ok = (l_fm <= torch.quantile(l_fm, cfg.quantile)) & (l_e <= torch.quantile(l_e, cfg.quantile))
        cand = torch.nonzero(ok).flatten()
        if len(cand) == 0:
            cand = torch.arange(n)
        k = max(1, int(round(cfg.kl_keep * len(cand))))
        top = cand[torch.argsort(kl[cand], descending=True)[:k]]
        idx = np.sort(top.numpy())
    else:
        raise ValueError(f"unknown selection rule {cfg.rule!r}; expected paper, quantile or all")
    stats.update(
        n_selected=int(len(idx)),
        fm_loss_mean_selected=float(l_fm[idx].mean()),
        fm_loss_mean_all=float(l_fm.mean()),
        kl_mean_selected=float(kl[idx].mean()),
        kl_mean_all=float(kl.mean()),
    )
    return idx.astype(np.int64), stats
