"""Helpers shared by several test modules (test modules import from here, never from each other)."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import app
from common import protocol as P
from common.codec import encode_probs, to_array_record
from common.models import build_model
from common.phantoms import phantom_site

# --- run configs --------------------------------------------------------------------------------

FEDAVG = {
    "method": "fedavg",
    "image-size": 32,
    "phantom-images-per-site": 12,
    "local-epochs": 1,
    "batch-size": 4,
}
DSFEDMED = {
    **FEDAVG,
    "method": "dsfedmed",
    "logit-size": 16,
    "pool-size": 8,
    "gen-size": 16,
    "gen-steps": 2,
    "gen-batch-size": 4,
}

DSFEDMED_HANDLER_RUN = {
    "method": "dsfedmed",
    "image-size": 32,
    "phantom-images-per-site": 12,
    "local-epochs": 1,
    "batch-size": 4,
    "logit-size": 16,
    "gen-size": 16,
    "gen-steps": 2,
    "gen-batch-size": 4,
}

DSFEDMED_TINY = {
    "method": "dsfedmed",
    "num-rounds": 2,
    "image-size": 32,
    "phantom-images-per-site": 16,
    "local-epochs": 1,
    "batch-size": 4,
    "pool-size": 8,
    "logit-size": 16,
    "selection-rho": 0.5,
    "fm-epochs": 1,
    "pool-score-epochs": 1,
}


# --- site contexts and messages -------------------------------------------------------------------


def site_context(run: dict, tmp, partition: int = 0, node_id: int = 3) -> Context:
    return Context(
        run_id=11,
        node_id=node_id,
        node_config={"partition-id": partition, "num-partitions": 2, "state-dir": str(tmp / "state")},
        state=RecordDict(),
        run_config=run,
    )


def site_contexts(run: dict, tmp) -> dict[int, Context]:
    return {n: site_context(run, tmp, partition=n - 1, node_id=n) for n in (1, 2)}


def global_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.numpy() for k, v in build_model("unet").state_dict().items()}


def phantom_pool_arrays(n=6):
    s = phantom_site(50, n, 32)
    return s.images, s.masks


def train_msg(selected, included="all", soft=None, pool=None, pool_id="p1"):
    images, masks = pool if pool is not None else phantom_pool_arrays()
    rec = RecordDict(
        {
            P.KEY_CONFIG: ConfigRecord(
                {
                    P.CFG_ROUND: 1,
                    P.CFG_POOL_ID: pool_id,
                    P.CFG_SELECTED: selected,
                    P.CFG_POOL_INCLUDED: included,
                }
            ),
            P.KEY_SOFT: to_array_record(
                {
                    P.ARR_PROBS: soft
                    if soft is not None
                    else encode_probs(np.full((len(selected), 1, 16, 16), 0.3), 16, "uint8")
                }
            ),
        }
    )
    if included == "all":
        rec[P.KEY_POOL] = to_array_record({P.ARR_IMAGES: images, P.ARR_MASKS: masks})
    elif included == "selected":
        rec[P.KEY_POOL] = to_array_record({P.ARR_IMAGES: images[selected], P.ARR_MASKS: masks[selected]})
    return Message(rec, dst_node_id=3, message_type=P.MSG_TRAIN)


# --- an in-process grid and a stub foundation model ------------------------------------------------


class ScriptedGrid:
    """Flower's Grid, in-process: every pushed message is answered at once by ``answer(node,
    message)`` (a reply Message), which the server then pulls."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer = list(nodes), answer
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []
        self._n = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self._n += 1
            mid = f"m{self._n}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed.append(m)
            node = m.metadata.dst_node_id
            rep = self.answer(node, m)
            rep.metadata.__dict__["_src_node_id"] = node
            self.replies[mid] = rep
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


class LoopbackGrid(ScriptedGrid):
    """Every pushed message is answered by the real ClientApp with the node's Context;
    ``damage(node, request, reply)`` may replace a reply before the server pulls it."""

    def __init__(self, contexts: dict[int, Context], damage=None):
        super().__init__(contexts, self._answer)
        self.contexts, self.damage = contexts, damage
        self.good: dict[tuple[int, str], Message] = {}  # (node, message type) -> last real reply

    def _answer(self, node: int, m: Message) -> Message:
        rep = app(m, self.contexts[node])
        rep.metadata.__dict__["_src_node_id"] = node
        self.good[(node, m.metadata.message_type)] = rep
        return self.damage(node, m, rep) if self.damage is not None else rep


class StubFM:
    def num_parameters(self):
        return 1


class StubTeacher:
    """Stands in for the foundation model (LiteMedSAM takes a minute per pool on a test machine):
    constant soft targets; ``distill`` records the ensemble the strategy hands it."""

    seen: list = []
    embed_seconds = 0.0

    def __init__(self, fm, images, masks, *_a, **_k):
        self.masks = torch.from_numpy(masks).float()

    def probs(self, idx, size):
        n = len(self.masks) if idx is None else len(idx)
        return torch.full((n, 1, size, size), 0.5)

    def masks_at(self, idx, size):
        m = self.masks[np.asarray(idx)]
        return (torch.nn.functional.interpolate(m, size=(size, size), mode="area") >= 0.5).float()

    def distill(self, idx, ens, *_a, **_k):
        StubTeacher.seen.append((np.asarray(idx).copy(), ens.detach().clone()))
        return 0.0

    def adapt(self, *_a, **_k):
        return 0.0

    def decoder_state(self):
        return {"w": np.zeros(1, np.float32)}

    def state(self):
        return {}

    def load_state(self, state):
        pass


# --- run directories ---------------------------------------------------------------------------------


def assert_complete_run_dir(run_dir, rounds, sites):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["run_config"]["num-rounds"] == rounds
    assert set(sites) <= set(cfg["site_profiles"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r in rows:
        assert set(r["sites"]) == set(sites)
        for s in r["sites"].values():
            assert 0 <= s["dice"] <= 1 and 0 <= s["iou"] <= 1 and s["n"] > 0
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["seconds"] > 0
        assert r["dice_mean"] is not None
    for r in rows[1:]:
        # FedAvg moves the whole model both ways: each site's upload is at least its weights
        assert all(v["up"] > 100_000 for v in r["bytes_per_site"].values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == rounds
    assert set(summary["test"]) == set(sites)
    # the summary also counts the final test evaluation, which has no metrics row
    assert summary["bytes_total"] > sum(r["bytes_down"] + r["bytes_up"] for r in rows)
    assert (run_dir / "dice.png").stat().st_size > 5_000
    assert (run_dir / "checkpoints" / "global_final.pt").is_file()
    assert len(list((run_dir / "checkpoints").glob("global_round_*.pt"))) == rounds
    return rows, summary
