"""Distillation losses of DSFedMed (paper and official code).

Per-pixel *binary* KL between sigmoid(logits/T) distributions, times T^2 (Hinton scaling, so the
gradient size does not shrink with T), used in both directions of the mutual distillation; plus a
supervised BCE on the synthetic masks with ``pos_weight`` (polyps are small: the paper uses 2).
The total is ``w_sup * supervised + w_kd * KL`` (paper: 0.9 / 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, kl_divergence
from torch.distributions.utils import probs_to_logits as _probs_to_logits

EPS = 1e-6


def binary_kl(p: torch.Tensor, q: torch.Tensor, reduce_dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) per element (torch.distributions' closed form), or averaged
    over ``reduce_dims``. Probabilities are kept within [EPS, 1 - EPS] first, so a hard 0/1 map gives
    a large finite KL, not inf."""
    kl = kl_divergence(
        Bernoulli(probs=p.clamp(EPS, 1 - EPS), validate_args=False),
        Bernoulli(probs=q.clamp(EPS, 1 - EPS), validate_args=False),
    )
    return kl if reduce_dims is None else kl.mean(dim=reduce_dims)


def probs_to_logits(p: torch.Tensor) -> torch.Tensor:
    """Logits of probabilities kept within [EPS, 1 - EPS] (torch's own helper, at this module's EPS)."""
    return _probs_to_logits(p.clamp(EPS, 1 - EPS), is_binary=True)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float = 1.0,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel KL(teacher || student) on sigmoid(logits/T), times T^2.

    ``teacher_probs`` are probabilities at T = 1 (what crosses the network); the receiver turns them
    back into logits and applies the same T to teacher and student. The student's logits are resized
    to the teacher's resolution if they differ. ``sample_weights`` (N,) in {0,1} gate the term per
    sample (selection gates distillation, never the supervised loss): the mean over gated samples.
    """
    if student_logits.shape[-2:] != teacher_probs.shape[-2:]:
        student_logits = F.interpolate(student_logits, size=teacher_probs.shape[-2:], mode="bilinear")
    teacher = torch.sigmoid(probs_to_logits(teacher_probs.detach().float()) / temperature)
    student = torch.sigmoid(student_logits / temperature)
    per_sample = binary_kl(teacher, student, tuple(range(1, student.ndim)))
    if sample_weights is None:
        return per_sample.mean() * temperature**2
    w = sample_weights.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0) * temperature**2


def supervised_bce(logits: torch.Tensor, masks: torch.Tensor, pos_weight: float = 2.0) -> torch.Tensor:
    if logits.shape[-2:] != masks.shape[-2:]:
        masks = F.interpolate(masks.float(), size=logits.shape[-2:], mode="nearest")
    pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, masks.float(), pos_weight=pw)


@dataclass(frozen=True)
class DistillWeights:
    supervised: float = 0.9
    kd: float = 0.1
    temperature: float = 1.0
    pos_weight: float = 2.0


def distillation_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    w: DistillWeights,
    kd_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w.supervised * BCE(masks) + w.kd * KL(teacher || student) * T^2`` (KL term only with a
    teacher). The supervised term sees every sample; ``kd_gate`` (N,) limits the KL term to the
    selected samples (as in the official code)."""
    loss = w.supervised * supervised_bce(logits, masks, w.pos_weight)
    if teacher_probs is not None and w.kd > 0 and (kd_gate is None or bool(kd_gate.any())):
        loss = loss + w.kd * kd_loss(logits, teacher_probs, w.temperature, kd_gate)
    return loss
