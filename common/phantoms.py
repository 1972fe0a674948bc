"""Built-in phantom hospital sites, generated deterministically in code.

They let ``flwr run .`` do a real federated run on a fresh machine with no data.  Objects and masks
come from MONAI's ``create_test_image_2d``; each site then gets its own acquisition "domain"
(tint, brightness, contrast/gamma, noise, blur, object size, share of empty frames), so the
federation has the visible domain shift that makes federated learning non-trivial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.data import DataReport, SiteArrays


@dataclass(frozen=True)
class Domain:
    tint: tuple[float, float, float]  # RGB colour of the tissue background
    object_tint: tuple[float, float, float]
    brightness: float
    gamma: float
    noise: float
    blur_sigma: float
    radius: tuple[float, float]  # object radius as a fraction of image size (min, max)
    max_objects: int
    empty_fraction: float


# Sites 0-3 are hand-picked to differ visibly; further sites draw a random domain from their index.
DOMAINS: tuple[Domain, ...] = (
    Domain((0.80, 0.45, 0.40), (0.95, 0.70, 0.55), 1.00, 1.0, 0.03, 0.0, (0.10, 0.22), 2, 0.05),
    Domain((0.55, 0.30, 0.35), (0.85, 0.50, 0.55), 0.85, 1.3, 0.08, 0.8, (0.06, 0.14), 3, 0.10),
    Domain((0.60, 0.55, 0.70), (0.80, 0.85, 0.95), 1.10, 0.7, 0.12, 0.4, (0.12, 0.28), 1, 0.05),
    Domain((0.70, 0.60, 0.45), (0.95, 0.90, 0.60), 0.90, 1.2, 0.05, 1.2, (0.08, 0.18), 2, 0.15),
)


def domain_for(index: int) -> Domain:
    if index < len(DOMAINS):
        return DOMAINS[index]
    r = np.random.default_rng([7919, index])
    return Domain(
        tuple(r.uniform(0.4, 0.9, 3)),
        tuple(r.uniform(0.6, 1.0, 3)),
        float(r.uniform(0.7, 1.1)),
        float(r.uniform(0.7, 1.6)),
        float(r.uniform(0.02, 0.12)),
        float(r.uniform(0.0, 1.2)),
        (float(r.uniform(0.05, 0.1)), float(r.uniform(0.14, 0.26))),
        int(r.integers(1, 4)),
        float(r.uniform(0.0, 0.15)),
    )


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    from monai.transforms import GaussianSmooth

    return np.asarray(GaussianSmooth(sigma=sigma)(torch.as_tensor(img)))


def phantom_site(index: int, n: int, image_size: int, seed: int = 0) -> SiteArrays:
    """Site ``phantom-<index>``: ``n`` RGB image/mask pairs at ``image_size`` px."""
    from monai.data.synthetic import create_test_image_2d

    dom = domain_for(index)
    rs = np.random.RandomState(np.random.default_rng([seed, 104729, index]).integers(2**31))
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    images = np.zeros((n, 3, s, s), np.uint8)
    masks = np.zeros((n, 1, s, s), np.uint8)
    for i in range(n):
        empty = rs.rand() < dom.empty_fraction
        if empty:
            seg = np.zeros((s, s), bool)
        else:
            _, lab = create_test_image_2d(
                s,
                s,
                num_objs=int(rs.randint(1, dom.max_objects + 1)),
                rad_max=max(3, int(dom.radius[1] * s)),
                rad_min=max(2, int(dom.radius[0] * s)),
                noise_max=0.0,
                num_seg_classes=1,
                random_state=rs,
            )
            seg = lab > 0
        # tissue: smooth illumination gradient plus low-frequency texture
        fx, fy, ph = rs.uniform(1, 4), rs.uniform(1, 4), rs.uniform(0, 2 * np.pi)
        shade = 0.75 + 0.25 * np.sin(2 * np.pi * (fx * xx + fy * yy) / 3 + ph)
        vign = 1.0 - 0.5 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        base = shade * vign
        rgb = np.stack([c * base for c in dom.tint])
        obj = np.stack([c * (0.85 + 0.15 * base) for c in dom.object_tint])
        rgb = np.where(seg[None], obj, rgb)
        # specular highlights: bright, unannotated distractors the model must learn to ignore
        for _ in range(rs.randint(0, 4)):
            cx, cy, r = rs.uniform(0, 1), rs.uniform(0, 1), rs.uniform(0.01, 0.04)
            spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
            rgb = rgb + 0.8 * spot[None]
        rgb = _blur(rgb.astype(np.float32), dom.blur_sigma)
        rgb = np.clip(rgb * dom.brightness, 0, 1) ** dom.gamma
        rgb = rgb + rs.normal(0, dom.noise, rgb.shape)
        images[i] = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
        masks[i, 0] = seg
    name = f"phantom-{index}"
    stems = [f"{name}-{i:04d}" for i in range(n)]
    report = DataReport(f"<built-in {name}>", n_images=n, n_masks=n, n_loaded=n)
    return SiteArrays(name, images, masks, stems, report, source_channels=3)


def write_phantom_site(folder: str | Path, index: int, n: int, image_size: int, seed: int = 0) -> Path:
    """Write a phantom site as a real ``images/`` + ``masks/`` folder (PNG), e.g. for a trial."""
    from PIL import Image

    site = phantom_site(index, n, image_size, seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for img, m, stem in zip(site.images, site.masks, site.stems, strict=True):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / "images" / f"{stem}.png")
        Image.fromarray(m[0] * 255).save(folder / "masks" / f"{stem}.png")
    return folder
