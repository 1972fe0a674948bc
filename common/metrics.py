"""Segmentation scores, one rule for every method, floor and report.

Per image, with MONAI's metrics and ``ignore_empty=False``: an empty ground truth scores 1 when the
prediction is empty too and 0 otherwise (PolypGen has polyp-free frames: C4 has 81). Scores are
averaged over images, then over sites.

- ``dice05`` / ``iou05``: the prediction thresholded at 0.5 (this project's headline figure).
- ``dice`` / ``iou``: averaged over the thresholds {0.1, 0.3, 0.5, 0.7, 0.9} (the DSFedMed paper's
  figure, reported beside the headline).
"""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, MeanIoU

THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
HEADLINE_THRESHOLD = 0.5


def per_image_scores_at(
    probs: torch.Tensor, target: torch.Tensor, thresholds: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per image and threshold, shape (T, N); ``probs``/``target`` are (N,1,H,W)."""
    if probs.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(probs.shape)} != target {tuple(target.shape)}")
    dice_fn = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou_fn = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    tgt = (target > 0.5).float()
    dices, ious = [], []
    for t in thresholds:
        pred = (probs >= t).float()
        dices.append(dice_fn(pred, tgt).mean(dim=1))
        ious.append(iou_fn(pred, tgt).mean(dim=1))
    return torch.stack(dices), torch.stack(ious)


def per_image_scores(
    probs: torch.Tensor, target: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per image averaged over ``thresholds``."""
    d, i = per_image_scores_at(probs, target, thresholds)
    return d.mean(0), i.mean(0)


class ThresholdedScores:
    """Accumulates per-image scores over batches: threshold-averaged and at 0.5."""

    def __init__(self) -> None:
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._at = THRESHOLDS.index(HEADLINE_THRESHOLD)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._rows.append(
            per_image_scores_at(probs.detach().float().cpu(), target.detach().float().cpu(), THRESHOLDS)
        )

    def result(self) -> dict[str, float]:
        if not self._rows:
            return {"dice": 0.0, "iou": 0.0, "dice05": 0.0, "iou05": 0.0, "n": 0}
        d = torch.cat([r[0] for r in self._rows], dim=1)
        i = torch.cat([r[1] for r in self._rows], dim=1)
        return {
            "dice": float(d.mean()),
            "iou": float(i.mean()),
            "dice05": float(d[self._at].mean()),
            "iou05": float(i[self._at].mean()),
            "n": int(d.shape[1]),
        }
