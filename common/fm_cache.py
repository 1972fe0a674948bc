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
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda p, e=e: np.save(p, e, allow_pickle=False))
                found[i] = e
            self.computed += len(idx)
            if progress is not None:
                progress(min(j + batch_size, len(todo)), len(todo))
        self.seconds += time.time() - t0
        if not len(images):
            return torch.zeros(0)
        return torch.from_numpy(np.stack([found[i] for i in range(len(images))]).astype(np.float32))
