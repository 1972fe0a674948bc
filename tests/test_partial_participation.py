"""Partial participation: k of N sites per round, every site asked about equally often; a site that
never answers is dropped in the rounds it was asked and never read."""

from __future__ import annotations

from collections import Counter

import pytest

from common.codec import to_array_record
from common.config import ConfigError, parse_run_config
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import Federation
from server_app.rundir import RunDirectory
from tests.support import FEDAVG, LoopbackGrid, global_weights, site_context


class _Nodes:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def test_every_site_is_asked_about_equally_often():
    fed = Federation(_Nodes(list(range(1, 11))))
    for n in range(1, 11):
        fed.name_site(n, f"h{n}")
    asked = Counter()
    for rnd in range(1, 31):
        chosen = fed.sample(list(range(1, 11)), 3, rnd, seed=7)
        assert len(chosen) == 3 and len(set(chosen)) == 3
        asked.update(chosen)
    assert set(asked.values()) == {9}  # 30 rounds x 3 = 90 = 10 sites x 9
    assert fed.sample([1, 2], 0, 1) == [1, 2] and fed.sample([1, 2], 5, 1) == [1, 2]
    # the draw is seeded: the same run config asks the same sites
    other = Federation(_Nodes([1, 2, 3, 4]))
    again = Federation(_Nodes([1, 2, 3, 4]))
    assert [other.sample([1, 2, 3, 4], 2, r, 3) for r in range(1, 5)] == [
        again.sample([1, 2, 3, 4], 2, r, 3) for r in range(1, 5)
    ]


def test_sites_per_round_below_min_sites_is_refused():
    with pytest.raises(ConfigError, match="below min-sites"):
        parse_run_config({"min-sites": 3, "sites-per-round": 2})


class _Silent(LoopbackGrid):
    """Node 3 never answers (its replies are never there to pull)."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid in ids:
            if (
                self.replies[mid].metadata.src_node_id == 3
                and self.replies[mid].metadata.message_type == "train"
            ):
                del self.replies[mid]
        return ids


@pytest.mark.integration  # three rounds that each wait out a silent site's deadline
def test_a_site_that_never_answers_is_dropped_only_where_it_was_asked(
    task_identity, tmp_path, one_torch_thread
):
    run = {**FEDAVG, "num-rounds": 3, "min-sites": 1, "sites-per-round": 2, "tensorboard": False,
           "sampling-deadline-s": 5.0, "round-timeout-s": 3.0, "evaluate-every": 3}  # fmt: skip
    contexts = {n: site_context(run, tmp_path, partition=n - 1, node_id=n) for n in (1, 2, 3)}
    for c in contexts.values():
        c.node_config["num-partitions"] = 3
    grid = _Silent(contexts)
    rundir = RunDirectory.create(str(tmp_path), "", "fedavg")
    strategy = DeadlineFedAvg(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
    strategy.start(grid, to_array_record(global_weights()), num_rounds=3, timeout=60.0)
    assert strategy.summary_data["status"] == "completed" and strategy.summary_data["rounds"] == 3
    rows = [r for r in rundir.read_metrics() if r["round"] >= 1]
    asked = strategy.fed.participation
    assert sum(asked.values()) == 6 and max(asked.values()) - min(asked.values()) <= 1
    silent = strategy.fed.site_of(3)
    for r in rows:
        trained = set(r["steps"])
        assert silent not in trained  # never read
        assert len(trained | set(r["dropped"])) == 2  # two asked: answered or dropped
    assert sum(silent in r["dropped"] for r in rows) == asked[silent]
