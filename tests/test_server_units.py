"""Server pieces without a Flower runtime: deadline sampling, byte counting, run directory."""

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common.codec import message_nbytes, to_array_record
from common.config import parse_run_config
from server_app.checkpoint import ResumeError, ServerState, check_compatible, load_state, save_state
from server_app.federation import Federation, FederationStopped
from server_app.rundir import RunDirectory

RESUME_CFG = {"method": "dsfedmed", "num-rounds": 2, "image-size": 32, "pool-source": "phantoms"}


class FakeGrid:
    def __init__(self, schedule):
        self.schedule = schedule  # list of (time offset, node ids)
        self.t0 = time.monotonic()

    def get_node_ids(self):
        now = time.monotonic() - self.t0
        ids = []
        for t, nodes in self.schedule:
            if now >= t:
                ids = nodes
        return ids


def test_sampling_returns_as_soon_as_min_sites_connect():
    fed = Federation(FakeGrid([(0, [1]), (0.2, [1, 2])]), poll_s=0.05)
    t = time.monotonic()
    assert fed.wait_for_nodes(2, deadline_s=5) == [1, 2]
    assert time.monotonic() - t < 2


def test_sampling_gives_up_at_deadline_with_reason():
    fed = Federation(FakeGrid([(0, [1])]), poll_s=0.05)
    t = time.monotonic()
    with pytest.raises(FederationStopped, match="only 1 site"):
        fed.wait_for_nodes(2, deadline_s=0.3)
    assert time.monotonic() - t < 2


def test_roster_waits_for_all_known_then_goes_on_with_enough():
    fed = Federation(FakeGrid([(0, [1, 2, 5])]), poll_s=0.05)
    # node 3 of the roster is gone: after the deadline, 1 and 2 are enough
    fed.name_site(3, "C3")
    assert fed.wait_for_nodes(2, deadline_s=0.3, among=[1, 2, 3]) == [1, 2]
    # the missing roster site is booked for the round's metrics row, once
    assert fed.take_absent() == ["C3"] and fed.take_absent() == []


def test_message_bytes_follow_payload(task_identity):
    small = fed_msg({"w": np.zeros(10, np.float32)})
    big = fed_msg({"w": np.zeros(1_000_000, np.float32)})
    assert 4_000_000 < message_nbytes(big) < 4_100_000
    assert message_nbytes(small) < 2_000


def fed_msg(arrays):
    fed = Federation(FakeGrid([]))
    return fed.make(1, "train", RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord()}))


def test_run_directory(tmp_path):
    rd = RunDirectory.create(str(tmp_path), "", "fedavg")
    assert rd.path.parent == tmp_path and rd.path.name.endswith("-fedavg")
    rd.append_metrics({"round": 0, "dice_mean": float("nan")})
    rd.append_metrics({"round": 1, "dice_mean": 0.5})
    assert [r["dice_mean"] for r in rd.read_metrics()] == [None, 0.5]
    rd.write_json("summary.json", {"x": np.float32(1.5)})
    assert json.loads((rd.path / "summary.json").read_text()) == {"x": 1.5}
    rd.save_checkpoint("c.pt", {"a": np.ones(3)}, {"round": 1})
    assert (rd.checkpoints / "c.pt").is_file()
    with pytest.raises(FileExistsError):
        RunDirectory.create(str(tmp_path), str(rd.path), "fedavg")


class ReplyingGrid(FakeGrid):
    """Push/pull like Flower's Grid: node 2 answers after ``delay`` seconds, node 3 never."""

    def __init__(self, delay):
        super().__init__([(0, [1, 2, 3])])
        self.delay, self.pushed = delay, {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{i}"
            m.metadata.__dict__["_message_id"] = mid  # what the SuperLink assigns
            self.pushed[mid] = (m, time.monotonic())
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import Message, MetricRecord

        out = []
        for mid in message_ids:
            m, t = self.pushed[mid]
            node = m.metadata.dst_node_id
            if node == 1 or (node == 2 and time.monotonic() - t >= self.delay):
                rep = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=m)
                rep.metadata.__dict__["_src_node_id"] = node
                out.append(rep)
        return out


def test_send_reports_who_is_still_awaited_and_stops_at_the_deadline(task_identity, caplog):
    from server_app.progress import ServerProgress

    seen = []

    class Recorder(ServerProgress):
        def exchange(self, label, answered, total, waiting, elapsed, timeout):
            seen.append((label, answered, total, tuple(waiting)))
            super().exchange(label, answered, total, waiting, elapsed, timeout)

    fed = Federation(
        ReplyingGrid(delay=0.2), poll_s=0.05, progress=Recorder(live=False, every_s=0.0), latency_s=0.0
    )
    for n, name in ((1, "A"), (2, "B"), (3, "C")):
        fed.name_site(n, name)
    msgs = [fed.make(n, "train", RecordDict({"config": ConfigRecord({"r": 1})}), 4) for n in (1, 2, 3)]
    with caplog.at_level("INFO", logger="dsfedmed.server"):
        ex = fed.send(msgs, timeout_s=0.6)
    assert set(ex.replies) == {"A", "B"} and ex.timeouts == ["C"]
    assert seen[0] == ("train (round 4)", 1, 3, ("B", "C")) and seen[-1][1:] == (2, 3, ("C",))
    assert "train (round 4): waiting for 2/3 sites (B, C)" in caplog.text
    assert fed.traffic.up["A"] > 0 and fed.traffic.up["B"] > 0 and not fed.traffic.up.get("C")


def test_tensorboard_board_gets_every_metrics_row(tmp_path, monkeypatch):
    from server_app import board

    row = {
        "round": 2,
        "dice_mean": 0.5,
        "bytes_up": 10,
        "dropped": ["C"],
        "sites": {"A": {"dice": 0.4, "iou": None}},
        "selection": {"n_selected": 4, "rule": "paper"},
    }
    assert board.scalars(row) == {
        "round/dice_mean": 0.5,
        "round/bytes_up": 10.0,
        "round/dropped_sites": 1.0,
        "site/A/dice": 0.4,
        "selection/n_selected": 4.0,
    }
    rundir = RunDirectory(tmp_path / "run")
    rundir.board = board.MetricsBoard.open(tmp_path / "run" / "tensorboard")
    rundir.append_metrics(row)
    rundir.board.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("round/dice_mean")] == [0.5]
    # without the package the server goes on without TensorBoard
    import builtins

    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    assert board.MetricsBoard.open(tmp_path / "other") is None


def test_send_deadline_grows_with_the_payload():
    """A send's deadline is compute time plus the largest message's transfer both ways at link-mbps."""
    fed = Federation(FakeGrid([]), link_mbps=8.0, latency_s=1.0)
    assert fed.deadline(0, 10.0) == 11.0
    assert fed.deadline(5_000_000, 10.0) == 10.0 + 2 * 5.0 + 1.0  # 5 MB at 1 MB/s, down and up


def test_messages_carry_the_state_key_without_touching_shared_content(task_identity):
    from common import protocol as P

    shared = RecordDict({"config": ConfigRecord({"r": 1})})
    fed = Federation(FakeGrid([]), state_key=42)
    msg = fed.make(1, "train", shared, 3)
    assert (
        msg.content.config_records["config"]["state-key"] == 42
        and msg.content.config_records["config"]["r"] == 1
    )
    assert P.CFG_STATE_KEY not in shared.config_records["config"]  # other sites' messages unchanged
    assert fed.make(2, "query.profile", RecordDict()).content.config_records["config"]["state-key"] == 42


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    cfg = parse_run_config(RESUME_CFG)
    st = ServerState(
        round=2, state_key=9, method="dsfedmed", run_config=cfg.to_flat(), history=[], traffic_down={},
        traffic_up={}, wall_seconds=1.0,
    )  # fmt: skip
    (tmp_path / "checkpoints").mkdir()
    save_state(tmp_path / "checkpoints", st)
    back = load_state(tmp_path)
    assert back.round == 2 and back.state_key == 9 and "torch" in back.rng
    check_compatible(back, parse_run_config({**RESUME_CFG, "num-rounds": 5, "round-timeout-s": 10.0}))
    with pytest.raises(ResumeError, match="seed: 0 -> 1"):
        check_compatible(back, parse_run_config({**RESUME_CFG, "num-rounds": 5, "seed": 1}))
    with pytest.raises(ResumeError, match="already holds 2 round"):
        check_compatible(back, parse_run_config({**RESUME_CFG, "num-rounds": 2}))
    with pytest.raises(ResumeError, match="no server checkpoint"):
        load_state(tmp_path / "elsewhere")
    (tmp_path / "checkpoints" / "state.json").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="cannot be read"):
        load_state(tmp_path)
