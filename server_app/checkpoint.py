"""The server's whole state after each round, written atomically, and resuming a run from it.

``<run-dir>/checkpoints/state.json`` (with its arrays in ``state.safetensors``; no pickle, see
``common/treefile.py``) holds everything the rounds after ``round`` depend on: the
method's model state (FedAvg's global weights; DSFedMed's FM decoder and its optimiser, the site
ensemble on the pool, which samples it covers, which sites hold the pool, global weights in
weight exchange), the synthetic pool's id (the pool itself is ``pool.npz`` beside it), the
metrics history (every row of ``metrics.jsonl``), traffic so far, the RNG states, and the
*state key*: the Flower run id of the run that started it. Every message carries that key
(config ``state-key``), so sites keep their own state under the same name in a resumed run.

``resume-from=<run-dir>`` (run config) starts a new Flower run that opens that directory, checks
the settings that shape the results are unchanged, rewrites ``metrics.jsonl`` to the saved history
(a row appended after the last checkpoint is dropped, the round is redone) and continues at the
next round.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.fileio import atomic_write_text
from common.treefile import TreeFileError, load_tree, save_tree

STATE_FILE = "state.json"  # arrays in state.safetensors beside it
VERSION = 2  # 1 was a pickled state.pt, which is never loaded

# run config keys a resumed run may change: they do not change what a round computes
RESUMABLE_CHANGES = {
    "num-rounds",
    "resume-from",
    "pause-after-round",
    "run-dir",
    "runs-root",
    "round-timeout-s",
    "sampling-deadline-s",
    "min-sites",
    "device",
    "server-threads",
    "num-threads",
    "tensorboard",
    "link-mbps",
}


class RunPaused(Exception):
    """The run stopped on purpose after a round's checkpoint (run config ``pause-after-round``)."""

    def __init__(self, rnd: int):
        super().__init__(f"paused after round {rnd}")
        self.round = rnd


class ResumeError(RuntimeError):
    """The run cannot be resumed from that directory; the message says why."""


@dataclass
class ServerState:
    round: int
    state_key: int
    method: str
    run_config: dict
    history: list[dict]
    traffic_down: dict[str, int]
    traffic_up: dict[str, int]
    wall_seconds: float
    strategy: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(rng: dict[str, Any]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "python" in rng:
        random.setstate(rng["python"])


def save_state(checkpoints: Path, state: ServerState) -> Path:
    payload = {"version": VERSION, **state.__dict__}
    payload["rng"] = capture_rng()
    return save_tree(checkpoints / STATE_FILE, payload)


def load_state(run_dir: Path) -> ServerState:
    path = Path(run_dir).expanduser() / "checkpoints" / STATE_FILE
    if not path.is_file() and path.with_name("state.pt").is_file():
        raise ResumeError(
            f"resume-from {run_dir}: {path.with_name('state.pt')} is a pickled checkpoint of an older "
            "version; pickles are never loaded (they can run code), so this run cannot be resumed"
        )
    if not path.is_file():
        raise ResumeError(
            f"resume-from {run_dir}: no server checkpoint at {path} (the run stopped before its first round "
            "ended, or this is not a run directory); start a new run instead"
        )
    try:
        payload = load_tree(path)
    except TreeFileError as exc:  # a damaged checkpoint must say so, not crash later
        raise ResumeError(f"resume-from {run_dir}: the checkpoint cannot be read ({exc})") from None
    fields = set(ServerState.__dataclass_fields__)
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise ResumeError(f"resume-from {run_dir}: {path} is not a version {VERSION} server checkpoint")
    payload.pop("version")
    if not fields >= set(payload) or not {"round", "state_key", "method", "run_config"} <= set(payload):
        raise ResumeError(f"resume-from {run_dir}: {path} does not hold a server state (fields differ)")
    return ServerState(**payload)


def check_compatible(state: ServerState, cfg: RunConfig) -> None:
    """The resumed run must compute what the interrupted one would have: same method, data, model,
    seed, pool and distillation settings (only RESUMABLE_CHANGES may differ)."""
    now = cfg.to_flat()
    changed = sorted(
        k
        for k in set(now) | set(state.run_config)
        if k not in RESUMABLE_CHANGES and now.get(k) != state.run_config.get(k)
    )
    if changed:
        detail = ", ".join(f"{k}: {state.run_config.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ResumeError(
            f"resume-from: the run config differs from the interrupted run's in {detail}; only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )
    if cfg.num_rounds <= state.round:
        raise ResumeError(
            f"resume-from: the checkpoint already holds {state.round} round(s); num-rounds is {cfg.num_rounds}"
        )


def rewrite_history(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` as of the checkpoint (a row of a round that was not checkpointed goes)."""
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
