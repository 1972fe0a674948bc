"""Fewer messages where the protocol allows: no per-round validation (``evaluate-every = 0``), and
validation carried by the train reply (``evaluate-in-train``), held to the site's evaluate policy.

Whole FedAvg runs through the real strategy and the real ClientApp on an in-process grid that
records every request it carries."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import ERR_PAYLOAD, app
from common import protocol as P
from common.codec import to_array_record
from common.config import parse_run_config
from server_app.fedavg import DeadlineFedAvg
from server_app.federation import Federation
from server_app.rundir import RunDirectory
from tests.support import FEDAVG, LoopbackGrid, global_weights, site_contexts


class RecordingGrid(LoopbackGrid):
    """The loopback grid, remembering (message type, round, config) of every request."""

    def __init__(self, contexts):
        super().__init__(contexts)
        self.sent: list[tuple[str, int, dict]] = []

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            conf = dict(m.content.config_records.get(P.KEY_CONFIG) or {})
            self.sent.append((m.metadata.message_type, int(conf.get(P.CFG_ROUND, -1)), conf))
        return super().push_messages(messages)


def _run(tmp_path, **run):
    run = {**FEDAVG, "num-rounds": 2, "min-sites": 2, "tensorboard": False, "sampling-deadline-s": 5.0, **run}
    grid = RecordingGrid(site_contexts(run, tmp_path))
    rundir = RunDirectory.create(str(tmp_path), "", "fedavg")
    strategy = DeadlineFedAvg(parse_run_config(run), Federation(grid, poll_s=0.01), rundir)
    strategy.start(grid, to_array_record(global_weights()), num_rounds=2, timeout=60.0)
    return grid, rundir.read_metrics(), strategy.summary_data


def _evaluations(grid, split):
    return [
        (rnd, conf)
        for kind, rnd, conf in grid.sent
        if kind == P.MSG_EVALUATE and conf.get(P.CFG_SPLIT) == split
    ]


def test_validation_travels_in_the_train_reply(task_identity, tmp_path, one_torch_thread):
    grid, rows, summary = _run(tmp_path, **{"evaluate-in-train": True})
    # no validation messages after round 0: the train requests ask for it instead
    assert [rnd for rnd, _ in _evaluations(grid, "val")] == [0, 0]
    asked = [conf.get(P.CFG_EVALUATE_SPLIT) for kind, _, conf in grid.sent if kind == P.MSG_TRAIN]
    assert asked == ["val"] * 4
    for r in rows[1:]:
        assert set(r["sites"]) == {"phantom-0", "phantom-1"} and r["validation_from"] == "train-replies"
        assert all(0 <= s["dice05"] <= 1 and s["n"] > 0 for s in r["sites"].values())
    assert summary["status"] == "completed" and summary["dice_test_mean"] is not None  # final test as before
    # the server's own CPU per stage (its thread only); a round's record is booked in the next row
    assert set(rows[1]["server_cpu_s"]) == {"send", "aggregate", "evaluate"}
    assert set(rows[2]["server_cpu_s"]) == {"send", "aggregate", "evaluate", "record_prev"}
    assert rows[2]["server_cpu_s_total"] == pytest.approx(sum(rows[2]["server_cpu_s"].values()), abs=1e-3)
    assert all(v >= 0 for v in rows[2]["server_cpu_s"].values())


def test_no_per_round_validation(task_identity, tmp_path, one_torch_thread):
    grid, rows, summary = _run(tmp_path, **{"evaluate-every": 0})
    assert _evaluations(grid, "val") == []
    assert [rnd for rnd, _ in _evaluations(grid, "test")] == [0, 0, 2, 2]  # baseline and final test
    assert all(r["sites"] == {} and r["dice_mean"] is None for r in rows)
    assert summary["dice_test_mean"] is not None


def _train_request(evaluate_split: str | None) -> Message:
    conf = {P.CFG_ROUND: 1}
    if evaluate_split is not None:
        conf[P.CFG_EVALUATE_SPLIT] = evaluate_split
    rec = RecordDict({P.KEY_ARRAYS: to_array_record(global_weights()), P.KEY_CONFIG: ConfigRecord(conf)})
    return Message(rec, dst_node_id=3, message_type=P.MSG_TRAIN)


def _site(tmp_path, policy: str = "") -> Context:
    node = {"phantom-id": 0, "site-name": "h0", "state-dir": str(tmp_path / "state")}
    if policy:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "policy.toml").write_text(policy)
        node["policy-file"] = str(tmp_path / "policy.toml")
    return Context(run_id=11, node_id=3, node_config=node, state=RecordDict(), run_config=dict(FEDAVG))


def test_a_train_replys_validation_obeys_the_sites_evaluate_policy(task_identity, tmp_path, one_torch_thread):
    """Asked in a train request, validation is an evaluation like any other: a site whose policy does
    not score 'val' trains and answers without scores; the per-run limit counts these requests too."""
    val_keys = {P.MET_VAL_PREFIX + k for k in ("dice", "iou", "dice05", "iou05", "num-examples")}
    rep = app(_train_request("val"), _site(tmp_path / "open"))
    assert not rep.has_error() and val_keys <= set(rep.content.metric_records[P.KEY_METRICS])
    rep = app(_train_request(None), _site(tmp_path / "plain"))
    assert not any(k.startswith(P.MET_VAL_PREFIX) for k in rep.content.metric_records[P.KEY_METRICS])
    closed = _site(tmp_path / "closed", '[evaluate]\nsplits = ["test"]\n')
    rep = app(_train_request("val"), closed)
    assert not rep.has_error() and P.KEY_ARRAYS in rep.content.array_records  # trained all the same
    assert not any(k.startswith(P.MET_VAL_PREFIX) for k in rep.content.metric_records[P.KEY_METRICS])
    limited = _site(tmp_path / "limited", '[evaluate]\nsplits = ["val"]\nmax-requests-per-run = 1\n')
    replies = [app(_train_request("val"), limited) for _ in range(2)]
    with_scores = [
        any(k.startswith(P.MET_VAL_PREFIX) for k in r.content.metric_records[P.KEY_METRICS]) for r in replies
    ]
    assert with_scores == [True, False]
    rep = app(_train_request("test"), _site(tmp_path / "test-split"))  # the test split never this way
    assert rep.has_error() and rep.error.code == ERR_PAYLOAD
