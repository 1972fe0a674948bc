"""Server pieces without a Flower runtime: deadline sampling, byte counting, run directory."""

import json
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common.codec import message_nbytes, to_array_record
from server_app.federation import Federation, FederationStopped
from server_app.rundir import RunDirectory


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
