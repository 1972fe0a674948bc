"""DSFedMed's round, stage by stage (server_app/dsfedmed.py, server_app/round_state.py), with a stub
teacher and a grid that only lists nodes: each stage does its one job and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import protocol as P
from common.codec import decode_probs
from common.config import parse_run_config
from server_app.checkpoint import RunPaused
from server_app.dsfedmed import DSFedMedStrategy
from server_app.federation import Exchange, Federation, FederationStopped
from server_app.round_state import Replies, RoundState
from server_app.rundir import RunDirectory
from server_app.selection import SelectionConfig
from server_app.synthesis import phantom_pool

N = 6
SIZE = 8


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


class _Teacher:
    def __init__(self, p: float = 0.8):
        self.p = p
        self.calls: list = []
        self.loaded = None

    def probs(self, idx, size):
        return torch.full((N if idx is None else len(idx), 1, size, size), self.p)

    def distill(self, idx, target, w, epochs, seed=0, kd_gate=None):
        self.calls.append((np.asarray(idx).copy(), target.clone(), kd_gate.clone()))
        return 0.1

    def state(self):
        return {"decoder": 1}

    def load_state(self, st):
        self.loaded = st


@pytest.fixture
def strategy(tmp_path, task_identity):
    cfg = parse_run_config(
        {"method": "dsfedmed", "logit-size": SIZE, "pool-size": N, "tensorboard": False, "min-sites": 2,
         "selection-rule": "paper", "selection-rho": 0.5, "target-fm-weight": 0.5, "pause-after-round": 2,
         "num-rounds": 4}
    )  # fmt: skip
    fed = Federation(_Grid(), poll_s=0.01)
    for node, name in ((1, "A"), (2, "B"), (3, "C")):
        fed.name_site(node, name)
    st = DSFedMedStrategy(cfg, fed, RunDirectory.create(str(tmp_path), "", "dsfedmed"))
    st.train_nodes = [1, 2, 3]
    return st


@pytest.fixture
def rs():
    pool = phantom_pool(N, 16, 0)
    masks = torch.from_numpy(pool.masks).float()
    return RoundState(
        pool=pool,
        pool_images=pool.images,
        pool_masks=pool.masks,
        pool_score=None,
        has_pool={1},
        fm=None,
        teacher=_Teacher(),
        weights_mode=False,
        arrays=None,
        ensemble=torch.zeros(N, 1, SIZE, SIZE),
        known=np.zeros(N, bool),
        masks_small=(torch.nn.functional.interpolate(masks, size=(SIZE, SIZE), mode="area") >= 0.5).float(),
    )


def test_select_gates_exactly_the_selected_samples(strategy, rs):
    sel = strategy._stage_select(rs, SelectionConfig(rule="paper", rho=0.5))
    assert len(sel.idx) == N // 2 and sel.stats["fm_only"]  # no site has answered yet
    assert torch.equal(torch.nonzero(sel.gate).flatten(), torch.from_numpy(sel.idx))
    rs.known[:] = True  # after round 1 every sample has the sites' view
    assert not strategy._stage_select(rs, SelectionConfig(rule="paper", rho=0.5)).stats["fm_only"]
    assert strategy._stage_select(rs, SelectionConfig(rule="all")).gate.sum() == N


def test_train_messages_give_each_site_the_other_sites_answers(strategy, rs):
    rs.site_probs = {"A": torch.full((N, 1, SIZE, SIZE), 0.2), "B": torch.full((N, 1, SIZE, SIZE), 0.6)}
    rs.site_counts = {"A": 100.0, "B": 100.0}
    sel = strategy._stage_select(rs, SelectionConfig(rule="paper", rho=0.5))
    msgs = {m.metadata.dst_node_id: m for m in strategy._stage_train_messages(rs, sel, rnd=2)}
    assert set(msgs) == {1, 2, 3}

    def target(node):
        arr = msgs[node].content.array_records[P.KEY_SOFT][P.ARR_PROBS].numpy()
        return float(decode_probs(arr, len(sel.idx), SIZE).mean())

    assert target(1) == pytest.approx(0.5 * 0.8 + 0.5 * 0.6, abs=0.01)  # A gets B's answer, not its own
    assert target(2) == pytest.approx(0.5 * 0.8 + 0.5 * 0.2, abs=0.01)
    assert target(3) == pytest.approx(0.5 * 0.8 + 0.5 * 0.4, abs=0.01)  # C: both others
    # the pool travels only to sites that do not hold it; everyone trains on all of it
    assert P.KEY_POOL not in msgs[1].content.array_records and P.KEY_POOL in msgs[2].content.array_records
    conf = msgs[2].content.config_records[P.KEY_CONFIG]
    assert conf[P.CFG_POOL_INCLUDED] == "all" and list(conf[P.CFG_SELECTED]) == [int(i) for i in sel.idx]


def test_accept_resends_the_pool_to_a_site_that_lost_it(strategy, rs):
    rs.has_pool = {1, 2}
    ex = Exchange(errors={"A": "error 1006: not cached"}, error_codes={"A": P.ERR_NO_POOL})
    with pytest.raises(FederationStopped, match="round 3: 0 usable train"):
        strategy._stage_accept(rs, ex, 3)
    assert rs.has_pool == {2}


def test_aggregate_weights_the_ensemble_by_training_set_size(strategy, rs):
    replies = Replies(
        probs={"A": torch.full((N, 1, SIZE, SIZE), 0.2), "B": torch.full((N, 1, SIZE, SIZE), 0.6)},
        counts={"A": 100.0, "B": 300.0},
    )
    sel = strategy._stage_select(rs, SelectionConfig(rule="paper", rho=0.5))
    strategy._stage_aggregate(rs, replies, sel, 1, result=None)
    assert torch.allclose(rs.ensemble, torch.full_like(rs.ensemble, 0.5)) and rs.known.all()
    assert set(rs.site_probs) == {"A", "B"} and rs.site_counts == {"A": 100.0, "B": 300.0}


def test_teacher_learns_on_every_sample_with_kl_on_the_selected(strategy, rs):
    sel = strategy._stage_select(rs, SelectionConfig(rule="paper", rho=0.5))
    rs.ensemble[:] = 0.3
    assert strategy._stage_teacher(rs, sel, 1) == 0.1
    ((idx, target, gate),) = rs.teacher.calls
    assert (
        list(idx) == list(range(N))
        and torch.equal(gate, sel.gate)
        and float(target.mean()) == pytest.approx(0.3)
    )


def test_round_state_survives_a_checkpoint(strategy, rs):
    rs.site_probs = {"A": torch.full((N, 1, SIZE, SIZE), 0.2)}
    rs.site_counts = {"A": 10.0}
    rs.known[:2] = True
    rs.initial_test = {"A": {"dice": 0.1}}
    saved = rs.checkpoint(strategy.fed)
    assert saved["has_pool"] == ["A"]
    fresh = RoundState(**{**rs.__dict__, "site_probs": {}, "site_counts": {}, "has_pool": set(),
                          "known": np.zeros(N, bool), "teacher": _Teacher()})  # fmt: skip
    fresh.restore(saved, strategy.fed, [1, 2, 3])
    assert fresh.has_pool == {1} and fresh.known.sum() == 2 and fresh.initial_test == rs.initial_test
    assert torch.equal(fresh.site_probs["A"], rs.site_probs["A"]) and fresh.teacher.loaded == {"decoder": 1}


def test_pause_comes_after_the_rounds_files(strategy):
    strategy._pause_if_due(1)  # not the pause round: nothing happens
    with pytest.raises(RunPaused):
        strategy._pause_if_due(2)
    strategy._pause_if_due(4)  # never after the last round
