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


def site_targets(
    fm_probs: torch.Tensor,
    site_probs: dict[str, torch.Tensor],
    site_weights: dict[str, float],
    site: str,
    fm_weight: float,
) -> torch.Tensor:
    others = [s for s in sorted(site_probs) if s != site and site_weights.get(s, 0.0) > 0]
    if not others or fm_weight >= 1.0:
        return fm_probs
    total = sum(site_weights[s] for s in others)
    ensemble = sum(site_weights[s] * site_probs[s] for s in others) / total
    return fm_weight * fm_probs + (1.0 - fm_weight) * ensemble


def ensemble(site_probs: dict[str, torch.Tensor], site_weights: dict[str, float]) -> torch.Tensor:
    """The sites' ensemble (weighted by training-set size): what the FM learns from (sites -> FM)."""
    names = sorted(site_probs)
    total = sum(site_weights[s] for s in names)
    return sum(site_weights[s] * site_probs[s] for s in names) / total
