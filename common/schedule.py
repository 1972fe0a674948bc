"""The learning rate of a round: one schedule over the whole run, the same for every method.

A site keeps its AdamW state across rounds (on disk, under the run's state key), so a round is a
slice of one long optimisation; the schedule is set by round so that central training (one epoch
block per round) and federated sites (local epochs per round) follow the same curve.
"""

from __future__ import annotations

import math

MIN_FRACTION = 0.01  # the cosine ends at 1% of the peak, never at zero


def round_learning_rate(peak: float, rnd: int, num_rounds: int, schedule: str, warmup_rounds: int) -> float:
    """``constant``: ``peak``. ``warmup-cosine``: linear warm-up to ``peak`` over the first
    ``warmup_rounds`` rounds (round ``warmup_rounds`` trains at the peak), then cosine decay
    evaluated at the middle of each round down towards 1% of the peak at the end of the run."""
    if schedule == "constant":
        return peak
    if schedule != "warmup-cosine":
        raise ValueError(f"unknown lr-schedule {schedule!r}")
    rnd = max(1, rnd)
    if rnd <= warmup_rounds:
        return peak * rnd / warmup_rounds
    span = max(1, num_rounds - warmup_rounds)
    t = min(1.0, (rnd - warmup_rounds - 0.5) / span)
    low = peak * MIN_FRACTION
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * t))
