"""Dice and IoU as the DSFedMed paper reports them: averaged over thresholds {0.1,...,0.9}.

Per image, per threshold, with MONAI's metrics and ``ignore_empty=False``: an empty ground truth
scores 1 when the prediction is empty too and 0 otherwise (PolypGen has polyp-free frames).
"""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, MeanIoU

THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def per_image_scores(
    probs: torch.Tensor, target: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU per image averaged over thresholds; ``probs``/``target`` are (N,1,H,W)."""
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
    return torch.stack(dices).mean(0), torch.stack(ious).mean(0)


class ThresholdedScores:
    """Accumulates per-image scores over batches."""

    def __init__(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._iou: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        d, i = per_image_scores(probs.detach().float().cpu(), target.detach().float().cpu())
        self._dice.append(d)
        self._iou.append(i)

    def result(self) -> dict[str, float]:
        if not self._dice:
            return {"dice": 0.0, "iou": 0.0, "n": 0}
        d, i = torch.cat(self._dice), torch.cat(self._iou)
        return {"dice": float(d.mean()), "iou": float(i.mean()), "n": int(d.numel())}
