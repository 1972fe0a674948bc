"""What a DSFedMed round carries from stage to stage, and what survives a restart.

``RoundState`` is everything a later round depends on: the pool and which sites hold it, the
teacher, the global weights (weights/hybrid exchange), the ensemble and each site's last answers.
``checkpoint`` is what ``server_app/checkpoint.py`` writes after every round, ``restore`` what a
resumed run reads back. ``Selection`` and ``Replies`` are one round's intermediate results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.codec import from_array_record


@dataclass
class Selection:
    idx: np.ndarray  # pool indices distillation applies to this round (S_r)
    gate: torch.Tensor  # (N,) 1 on S_r
    stats: dict
    fm_probs: torch.Tensor  # the FM's probabilities (T = 1) on every pool sample


@dataclass
class Replies:
    valid: list = field(default_factory=list)  # accepted train replies
    probs: dict[str, torch.Tensor] = field(default_factory=dict)  # by site, on the whole pool
    counts: dict[str, float] = field(default_factory=dict)  # by site: training-set size
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundState:
    pool: object  # server_app.synthesis.Pool
    pool_images: np.ndarray  # at image-size
    pool_masks: np.ndarray
    pool_score: dict | None
    has_pool: set[int]  # node ids that hold the pool (sent by id to them)
    fm: object  # common.foundation.FoundationSegmenter
    teacher: object  # server_app.teacher.FoundationTeacher
    weights_mode: bool
    arrays: ArrayRecord | None
    ensemble: torch.Tensor  # (N,1,s,s) the sites' last ensemble
    known: np.ndarray  # (N,) samples with an ensemble answer
    masks_small: torch.Tensor  # the pool masks at logit-size (selection)
    # each site's latest probabilities on the pool and its weight: the other sites' part of a site's
    # targets (server_app/targets.py)
    site_probs: dict[str, torch.Tensor] = field(default_factory=dict)
    site_counts: dict[str, float] = field(default_factory=dict)
    initial_test: dict = field(default_factory=dict)

    def checkpoint(self, fed) -> dict:
        """Everything a later round depends on (sites by name: node ids may change on a restart)."""
        return {
            "pool_id": self.pool.pool_id,
            "pool_score": self.pool_score,
            "has_pool": sorted(fed.site_of(n) for n in self.has_pool),
            "initial_test": self.initial_test,
            "arrays": from_array_record(self.arrays) if self.arrays is not None else None,
            "ensemble": self.ensemble.clone(),
            "known": self.known.copy(),
            "teacher": self.teacher.state(),
            "site_probs": {s: p.clone() for s, p in self.site_probs.items()},
            "site_counts": dict(self.site_counts),
        }

    def restore(self, st: dict, fed, train_nodes: list[int]) -> None:
        self.has_pool = {n for n in train_nodes if fed.site_of(n) in set(st["has_pool"])}
        self.initial_test = st["initial_test"]
        self.teacher.load_state(st["teacher"])
        self.ensemble = st["ensemble"].clone()
        self.known = np.asarray(st["known"]).copy()
        self.site_probs = {s: p.clone() for s, p in st.get("site_probs", {}).items()}
        self.site_counts = dict(st.get("site_counts", {}))
        if self.weights_mode:
            self.arrays = ArrayRecord({k: Array(v) for k, v in st["arrays"].items()})
