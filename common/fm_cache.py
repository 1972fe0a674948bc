"""A site's (or the server's) on-disk cache of frozen FM image embeddings.

The FM's image encoder is frozen whenever only its mask decoder is trained or used (the fedfm-decoder
baseline, the FM floors, the DSFedMed teacher), so an image's embedding is computed once and reused by
every later run and seed with the same image, FM weights and input size. Entries are keyed by the
SHA-256 of (FM name, checkpoint id, encoder input size, the uint8 image's shape and bytes) and stored
as float16 ``.npy`` files (no pickle), written atomically; a damaged entry is recomputed. At 64x64x256
per image an entry is 2 MiB. The cache lives outside any run's state folder (default
``<cache-dir>/fm-embeddings``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.fileio import atomic_write
from common.foundation import FoundationSegmenter

log = logging.getLogger("dsfedmed.fm_cache")


class EmbeddingCache:
    def __init__(self, root: Path, fm_name: str, checkpoint_id: str, input_size: int):
        self.root = Path(root).expanduser()
        self.prefix = f"{fm_name}\0{checkpoint_id}\0{input_size}\0".encode()
        self.computed = 0  # embeddings computed (not found) by this object
        self.seconds = 0.0

    def key(self, image: np.ndarray) -> str:
        h = hashlib.sha256(self.prefix)
        h.update(str(image.shape).encode() + str(image.dtype).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr if arr.ndim == 3 and np.isfinite(arr).all() else None

    def embeddings(
        self,
        fm: FoundationSegmenter,
        images: np.ndarray,
        batch_size: int = 4,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """float32 embeddings (N,C,h,w) of uint8 images (N,3,H,W): from the cache, else computed
        with ``fm``'s frozen encoder and stored."""
        import time

        keys = [self.key(img) for img in images]
        found: dict[int, np.ndarray] = {}
        for i, k in enumerate(keys):
            p = self.path(k)
            if p.is_file():
                arr = self._read(p)
                if arr is not None:
                    found[i] = arr
        todo = [i for i in range(len(images)) if i not in found]
        t0 = time.time()
        for j in range(0, len(todo), batch_size):
            idx = todo[j : j + batch_size]
            with torch.no_grad():
                emb = fm.embed(torch.from_numpy(np.ascontiguousarray(images[idx])))
            for i, e in zip(idx, emb.cpu().numpy().astype(np.float16), strict=True):
                path = self.path(keys[i])
                atomic_write(path, lambda p, e=e: np.save(p, e, allow_pickle=False))
                found[i] = e
            self.computed += len(idx)
            if progress is not None:
                progress(min(j + batch_size, len(todo)), len(todo))
        self.seconds += time.time() - t0
        if not len(images):
            return torch.zeros(0)
        return torch.from_numpy(np.stack([found[i] for i in range(len(images))]).astype(np.float32))


class CachedPromptFreeSegmenter(torch.nn.Module):
    """The FM as a site model whose image encoder never runs twice on the same image: float images
    (N,3,H,W) in [0,1] (uint8/255, as the site's loader makes them) in, logits at HxW out, prompted
    with the whole-image box; embeddings come from an :class:`EmbeddingCache` (and a per-process
    memory copy in float16). Only the mask decoder trains and travels (``exchanged_module``): the
    fedfm-decoder baseline (FedMSA direction) at CPU cost. Augmentation must be off for it: a flipped
    image is a new image to the encoder."""

    def __init__(self, fm: FoundationSegmenter, cache: EmbeddingCache):
        super().__init__()
        if not fm.freeze_encoder:
            raise ValueError("cached embeddings need a frozen image encoder (fm-trainable='decoder')")
        self.fm = fm
        self.cache = cache
        self._memory: dict[str, np.ndarray] = {}
        self.trainable = "decoder"

    @property
    def exchanged_module(self) -> torch.nn.Module:
        return self.fm.decoder

    def _embeddings(self, images: np.ndarray) -> torch.Tensor:
        keys = [self.cache.key(img) for img in images]
        missing = [i for i, k in enumerate(keys) if k not in self._memory]
        if missing:
            emb = self.cache.embeddings(self.fm, images[missing])
            for i, e in zip(missing, emb.numpy().astype(np.float16), strict=True):
                self._memory[keys[i]] = e
        return torch.from_numpy(np.stack([self._memory[k] for k in keys]).astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = (x.detach().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        dev = next(self.fm.decoder.parameters()).device
        emb = self._embeddings(images).to(dev)
        boxes = self.fm.prompts(len(images), "whole-box", None)
        return self.fm.decode(emb, boxes, x.shape[-1])
