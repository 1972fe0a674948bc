"""A site's state on disk: its own model (logits exchange) and the cached synthetic pool.

In ``logits`` exchange the site model never leaves the site, so it must survive between messages
(Flower may start a fresh ClientApp process for each) and restarts. Files are written atomically.
Layout: ``<state-dir>/run-<run id>/<site>/{model.pt, model.json, pool-<id>.npz}``; ``model.json``
says what ``model.pt`` is (network name, input channels, image size, run, round) so that
``dsfedmed predict`` can rebuild it at the site without the run config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.data import default_cache_dir
from common.fileio import atomic_savez, atomic_write, atomic_write_text


class SiteStore:
    def __init__(self, state_dir: str, run_id: int, site: str):
        root = Path(state_dir).expanduser() if state_dir else default_cache_dir() / "state"
        self.dir = root / f"run-{run_id}" / site
        self.dir.mkdir(parents=True, exist_ok=True)

    # model
    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    def load_model(self) -> dict[str, np.ndarray] | None:
        if not self.model_path.is_file():
            return None
        state = torch.load(self.model_path, map_location="cpu", weights_only=True)
        return {k: v.numpy() for k, v in state.items()}

    @property
    def model_meta_path(self) -> Path:
        return self.dir / "model.json"

    def save_model(self, weights: dict[str, np.ndarray], meta: dict | None = None) -> None:
        """Save the site model; ``meta`` (model, channels, image-size, round, ...) goes to model.json."""
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        atomic_write(self.model_path, lambda p: torch.save(state, p))
        if meta is not None:
            atomic_write_text(self.model_meta_path, json.dumps(meta, indent=2) + "\n")

    def load_model_meta(self) -> dict | None:
        if not self.model_meta_path.is_file():
            return None
        return json.loads(self.model_meta_path.read_text())

    # pool
    def pool_path(self, pool_id: str) -> Path:
        safe = "".join(c for c in pool_id if c.isalnum() or c in "-_")[:64]
        return self.dir / f"pool-{safe}.npz"

    def save_pool(self, pool_id: str, images: np.ndarray, masks: np.ndarray) -> None:
        atomic_savez(self.pool_path(pool_id), images=images, masks=masks)

    def load_pool(self, pool_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.pool_path(pool_id)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["masks"]
