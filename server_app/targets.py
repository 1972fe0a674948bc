"""What a site learns from in DSFedMed: the FM's knowledge and the other sites' knowledge, mixed.

Rule (``target-fm-weight`` = w): for site k and pool sample i,

    target_k(i) = w * p_FM(i) + (1 - w) * sum_{j != k} n_j p_j(i) / sum_{j != k} n_j

with p_j the probabilities site j sent on the pool last round and n_j its training-set size. A site
never gets its own answer back (that would teach it nothing), and until other sites have answered
the FM alone is the target. Probabilities are at T = 1; the receiver applies the temperature.
A newcomer (the held-out hospital) gets the same rule over all training sites.
"""

from __future__ import annotations

import torch


class Targets:
    """Every site's targets of one round from one pass over the answers: the weighted sum of all
    sites' probabilities is made once, and site k's "others" ensemble is that sum less its own
    share, so a round costs O(sites x pool), not O(sites^2 x pool) (issue: many sites)."""

    def __init__(
        self, fm_probs: torch.Tensor, site_probs: dict[str, torch.Tensor], site_weights: dict[str, float]
    ):
        self.fm = fm_probs
        self.probs = {s: p for s, p in site_probs.items() if site_weights.get(s, 0.0) > 0}
        self.weights = {s: float(site_weights[s]) for s in self.probs}
        self.total_w = sum(self.weights.values())
        self.total = sum(w * self.probs[s] for s, w in sorted(self.weights.items())) if self.probs else None

    def of(self, site: str, fm_weight: float) -> torch.Tensor:
        own_w = self.weights.get(site, 0.0)
        others_w = self.total_w - own_w
        if self.total is None or fm_weight >= 1.0 or others_w <= 0:  # nobody else answered
            return self.fm
        others = self.total - own_w * self.probs[site] if own_w else self.total
        return fm_weight * self.fm + (1.0 - fm_weight) * (others / others_w).clamp(0.0, 1.0)


def site_targets(
    fm_probs: torch.Tensor,
    site_probs: dict[str, torch.Tensor],
    site_weights: dict[str, float],
    site: str,
    fm_weight: float,
) -> torch.Tensor:
    """One site's targets (:class:`Targets` for a single site)."""
    return Targets(fm_probs, site_probs, site_weights).of(site, fm_weight)


def ensemble(site_probs: dict[str, torch.Tensor], site_weights: dict[str, float]) -> torch.Tensor:
    """The sites' ensemble (weighted by training-set size): what the FM learns from (sites -> FM)."""
    names = sorted(site_probs)
    total = sum(site_weights[s] for s in names)
    return sum(site_weights[s] * site_probs[s] for s in names) / total
