"""The synthetic pool: (image, mask) pairs the federation distils on, and where they come from.

Sources (``pool-source``):
  ``generator``  every site trains its mask-conditioned diffusion generator on private pairs and
                 sends only the weights (``train.generator``); the server samples images from each
                 site's generator, conditioned on random irregular-ellipse masks drawn from that
                 site's mask-size statistics. No real image or mask leaves a site.
  ``phantoms``   built-in phantom images from domains no site uses.
  ``folder``     an operator-provided folder of public image/mask pairs (``pool-folder``).
The pool is stored in the run directory (``pool.npz`` + ``pool.png`` contact sheet) and, with
``pool-dir``, reused by later runs whose pool settings match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.fileio import atomic_savez
from common.generator import GeneratorConfig, random_masks, sample_images


@dataclass
class Pool:
    images: np.ndarray  # (N,3,S,S) uint8
    masks: np.ndarray  # (N,1,S,S) uint8 {0,1}
    sources: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pool_id(self) -> str:
        h = hashlib.sha256(self.images.tobytes())
        h.update(self.masks.tobytes())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> Path:
        return atomic_savez(
            path,
            images=self.images,
            masks=self.masks,
            sources=np.array(self.sources),
            meta=np.array(json.dumps(self.meta)),
        )

    @classmethod
    def load(cls, path: Path) -> Pool:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["images"], z["masks"], [str(s) for s in z["sources"]], json.loads(str(z["meta"])))


def phantom_pool(n: int, image_size: int, seed: int) -> Pool:
    from common.phantoms import phantom_site

    per = max(1, n // 4)
    parts = [phantom_site(100 + k, per, image_size, seed) for k in range((n + per - 1) // per)]
    images = np.concatenate([p.images for p in parts])[:n]
    masks = np.concatenate([p.masks for p in parts])[:n]
    sources = [p.name for p in parts for _ in range(per)][:n]
    return Pool(images, masks, sources, {"source": "phantoms"})


def folder_pool(folder: str, n: int, image_size: int, seed: int) -> Pool:
    from common.data import load_site_folder

    site = load_site_folder(folder, image_size, name="pool")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(site), size=min(n, len(site)), replace=False))
    return Pool(
        site.images[idx], site.masks[idx], ["folder"] * len(idx), {"source": "folder", "folder": folder}
    )


def generator_pool(
    generators: dict[str, tuple[dict, dict]],
    cfg: GeneratorConfig,
    n: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> Pool:
    """Sample ``n`` pairs, split evenly over the sites' generators (weights, stats), at the
    generator's own size: that is how the pool is stored and sent (sites and server resize it to
    the run's image size with :func:`common.transforms.resize_pairs`; upsampling first would only
    multiply the bytes on the wire)."""
    sites = sorted(generators)
    counts = [n // len(sites) + (1 if i < n % len(sites) else 0) for i in range(len(sites))]
    images, masks, sources = [], [], []
    for k, (site, count) in enumerate(zip(sites, counts, strict=True)):
        if count == 0:
            continue
        state, stats = generators[site]
        m_small = random_masks(
            count, cfg.size, stats["mask_log_fg_mean"], stats["mask_log_fg_std"], seed * 1000 + k
        )
        imgs = sample_images(state, cfg, m_small, seed=seed * 1000 + k, device=device)
        images.append(imgs)
        masks.append(m_small)
        sources += [site] * count
    return Pool(np.concatenate(images), np.concatenate(masks), sources, {"source": "generator"})


def contact_sheet(pool: Pool, path: Path, n: int = 32, cols: int = 8) -> Path:
    """PNG grid of pool samples with their mask outlines in green, labelled by source site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(pool))
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.6), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(np.linspace(0, len(pool) - 1, n).round().astype(int)):  # every source shown
        ax = axes.flat[k]
        ax.imshow(pool.images[i].transpose(1, 2, 0))
        if pool.masks[i].any():
            ax.contour(pool.masks[i, 0], levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(pool.sources[i], fontsize=6)
    fig.suptitle(f"synthetic pool ({pool.meta.get('source', '?')}, {len(pool)} samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
