"""Bugs found in review, each pinned by a test that failed before its fix (issue: lean and correct
at the site, "correctness found in review")."""

from __future__ import annotations

import subprocess
import time

from flwr.app import Message, RecordDict

from common import protocol as P
from common.config import parse_run_config
from deploy.local import stream_until
from server_app import dsfedmed as ds
from server_app.federation import Federation
from server_app.rundir import RunDirectory


def test_a_silent_child_still_times_out():
    """deploy local read the child's output line by line and looked at the clock only when a line
    came: a child that hangs without printing was never stopped."""
    proc = subprocess.Popen(
        ["bash", "-c", "echo started; sleep 300"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    seen: list[str] = []
    t0 = time.monotonic()
    timed_out = stream_until(proc, t0 + 2.0, seen.append)
    assert timed_out and seen == ["started\n"]
    assert time.monotonic() - t0 < 20 and proc.poll() is not None
    quick = subprocess.Popen(["echo", "done"], stdout=subprocess.PIPE, text=True)
    assert stream_until(quick, time.monotonic() + 30, seen.append) is False and seen[-1] == "done\n"


class _SlowGrid:
    """Answers a message only on the pull after the sender's deadline has passed."""

    def __init__(self):
        self.pushed: list[Message] = []
        self.pulls = 0
        self.late_after = 3

    def get_node_ids(self):
        return [1]

    def push_messages(self, messages):
        self.pushed += list(messages)
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.late_after:
            return []
        out = []
        for mid in ids:
            msg = self.pushed[int(mid[1:])]
            rep = Message(RecordDict(), reply_to=msg)
            rep.metadata.__dict__["_reply_to_message_id"] = mid  # as the SuperLink sets it
            out.append(rep)
        return out


def test_a_reply_after_its_deadline_is_still_counted(task_identity):
    grid = _SlowGrid()
    fed = Federation(grid, poll_s=0.01, latency_s=0.0)
    fed.name_site(1, "A")
    msg = fed.make(1, P.MSG_EVALUATE, RecordDict(), 1)
    ex = fed.send([msg], timeout_s=0.0)  # nobody answers in time
    assert ex.timeouts == ["A"] and fed.traffic.up.get("A", 0) == 0
    assert fed.collect_late() == 1 and not fed._late  # it came after all: its bytes are booked as late
    assert fed.traffic.up["A"] > 0 and fed.traffic.by_kind["late"] == fed.traffic.up["A"]
    assert fed.traffic.by_kind["evaluate"] > 0  # the request, booked by its kind


def _pool_key(tmp_path, **cfg):
    run = parse_run_config({"method": "dsfedmed", "pool-source": "generator", "pool-seed": 0, **cfg})

    class _G:
        def get_node_ids(self):
            return []

    return ds.DSFedMedStrategy(run, Federation(_G()), RunDirectory(tmp_path))._pool_key()


def test_a_pool_from_another_split_is_not_reused(tmp_path):
    """The generators learn from the training split: with a fixed pool seed, a pool made under another
    split seed, other fractions or another grouping pattern was reused (a possible test leak)."""
    base = _pool_key(tmp_path)
    assert _pool_key(tmp_path, seed=1) != base
    assert _pool_key(tmp_path, **{"val-fraction": 0.1}) != base
    assert _pool_key(tmp_path, **{"split-group-regex": "^(x)"}) != base
    assert _pool_key(tmp_path) == base
    # a split file is known by its content, not its path
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"C1": {"train": ["x"]}}')
    b.write_text('{"C1": {"train": ["x"]}}')
    assert _pool_key(tmp_path, **{"split-file": str(a)}) == _pool_key(tmp_path, **{"split-file": str(b)})
    b.write_text('{"C1": {"train": ["y"]}}')
    assert _pool_key(tmp_path, **{"split-file": str(a)}) != _pool_key(tmp_path, **{"split-file": str(b)})
