"""MONAI transforms: uint8 site arrays -> float tensors, with optional augmentation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
)


def _to_unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


AUGMENT_SETS = ("full", "flips")


def train_transforms(augment: bool, kind: str = "full") -> Compose:
    """``kind``: 'full' (flips, 90-degree turns, affine, intensity, noise) or 'flips' (the two
    flips alone: cheap on a CPU, and what the benchmark's calibrated recipe uses)."""
    if kind not in AUGMENT_SETS:
        raise ValueError(f"unknown augmentation set {kind!r}; expected one of {AUGMENT_SETS}")
    base = [
        Lambdad("image", _to_unit),
        Lambdad("mask", lambda m: m.astype(np.float32)),
    ]
    aug = [
        RandFlipd(["image", "mask"], prob=0.5, spatial_axis=0),
        RandFlipd(["image", "mask"], prob=0.5, spatial_axis=1),
        RandRotate90d(["image", "mask"], prob=0.5, max_k=3),
        RandAffined(
            ["image", "mask"],
            prob=0.3,
            rotate_range=0.3,
            scale_range=0.15,
            mode=("bilinear", "nearest"),
            padding_mode="reflection",
        ),
        RandScaleIntensityd("image", factors=0.15, prob=0.3),
        RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoised("image", std=0.02, prob=0.2),
    ]
    if kind == "flips":
        aug = aug[:2]
    return Compose(base + (aug if augment else []) + [EnsureTyped(["image", "mask"], track_meta=False)])


def eval_transforms() -> Compose:
    return train_transforms(augment=False)


def make_dataset(images: np.ndarray, masks: np.ndarray, augment: bool, kind: str = "full") -> Dataset:
    data = [{"image": i, "mask": m} for i, m in zip(images, masks, strict=True)]
    return Dataset(data, transform=train_transforms(augment, kind))


def to_float_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def resize_pairs(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N,3,S,S) images and {0,1} (N,1,S,S) masks at ``size`` (bilinear; masks thresholded at
    0.5). The server and the sites both call this on the synthetic pool, which travels at the size
    it was made at, so both see the same pixels. A no-op when the size already matches."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images, masks
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    img = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) >= 0.5
    return img.round().clamp(0, 255).byte().numpy(), m.byte().numpy()
