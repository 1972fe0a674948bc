"""A site's state on disk: its own model and optimiser (logits exchange) and the cached pool.

In ``logits`` exchange the site model never leaves the site, so it must survive between messages
(Flower may start a fresh ClientApp process for each) and restarts. Files are written atomically.
Layout: ``<state-dir>/run-<state key>/<site>/``:

- ``round-<r>.pt``: the model *and its optimisers* after round r (the last few rounds are kept).
  A request for round r starts from the newest snapshot of an earlier round, so a round that is
  asked again (the site restarted, the server resumed) is computed from the same state and gives
  the same result; a site that joins late has none and starts from its initial model.
- ``model.pt`` + ``model.json``: the newest model and what it is (network name, input channels,
  image size, run, round), so that ``dsfedmed predict`` can rebuild it without the run config.
- ``pool-<id>.npz`` (the synthetic pool). The DP ledger is the site's, not a run's
(``<state-dir>/privacy-ledger.json``, :mod:`client_app.privacy`).

The state key is the Flower run id of the run that started the federation's state (a resumed run
keeps it: ``server_app/checkpoint.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.data import default_cache_dir
from common.fileio import atomic_savez, atomic_write, atomic_write_text, private_mkdir


class SiteStore:
    def __init__(self, state_dir: str, state_key: int, site: str):
        root = Path(state_dir).expanduser() if state_dir else default_cache_dir() / "state"
        self.dir = private_mkdir(root / f"run-{state_key}" / site)

    # model
    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    def _snapshot(self, server_round: int) -> Path:
        return self.dir / f"round-{server_round:04d}.pt"

    def snapshots(self) -> dict[int, Path]:
        out = {}
        for p in self.dir.glob("round-*.pt"):
            try:
                out[int(p.stem.split("-", 1)[1])] = p
            except ValueError:
                continue
        return dict(sorted(out.items()))

    def load_model(self, before_round: int | None = None) -> dict[str, np.ndarray] | None:
        """The model to start round ``before_round`` from (newest snapshot of an earlier round); with
        no round, the newest model. None: the site has no state yet (initial model)."""
        got = self.load_state(before_round)
        return None if got is None else got[0]

    def load_state(self, before_round: int | None = None) -> tuple[dict[str, np.ndarray], dict] | None:
        """(model weights, optimiser states) as :meth:`load_model` picks them."""
        snaps = self.snapshots()
        if before_round is not None:
            snaps = {r: p for r, p in snaps.items() if r < before_round}
        if snaps:
            payload = torch.load(snaps[max(snaps)], map_location="cpu", weights_only=True)
            return {k: v.numpy() for k, v in payload["model"].items()}, payload.get("optim", {})
        if before_round is None and self.model_path.is_file():  # a state dir from before snapshots
            state = torch.load(self.model_path, map_location="cpu", weights_only=True)
            return {k: v.numpy() for k, v in state.items()}, {}
        return None

    @property
    def model_meta_path(self) -> Path:
        return self.dir / "model.json"

    def save_model(
        self,
        weights: dict[str, np.ndarray],
        meta: dict | None = None,
        server_round: int | None = None,
        optim: dict | None = None,
        keep: int = 3,
    ) -> None:
        """Save the site model (and, with ``server_round``, a snapshot with its optimiser states);
        ``meta`` (model, channels, image-size, round, ...) goes to model.json."""
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        if server_round is not None:
            payload = {"model": state, "optim": optim or {}, "round": int(server_round)}
            atomic_write(self._snapshot(server_round), lambda p: torch.save(payload, p))
            for r in list(self.snapshots())[:-keep]:
                self._snapshot(r).unlink(missing_ok=True)
        atomic_write(self.model_path, lambda p: torch.save(state, p))
        if meta is not None:
            atomic_write_text(self.model_meta_path, json.dumps(meta, indent=2) + "\n")

    def save_optimizer(self, optim: dict, server_round: int, keep: int = 3) -> None:
        """A snapshot holding only optimiser states (a FedAvg site: the model is the server's)."""
        payload = {"model": {}, "optim": optim, "round": int(server_round)}
        atomic_write(self._snapshot(server_round), lambda p: torch.save(payload, p))
        for r in list(self.snapshots())[:-keep]:
            self._snapshot(r).unlink(missing_ok=True)

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
