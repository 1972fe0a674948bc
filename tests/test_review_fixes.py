"""Bugs found in review, each pinned by a test that failed before its fix (issue: lean and correct
at the site, "correctness found in review")."""

from __future__ import annotations

import subprocess
import time

from flwr.app import Message, RecordDict

from common import protocol as P
from common.config import parse_run_config
from deploy.processes import stream_until
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


FAKE_FLWR = """#!/bin/bash
# stands in for the flwr CLI: 'run' starts run 42 and a child, then hangs without a word
case "$1" in
  run) echo "Successfully started run 42"; sleep 300 & echo $! > "$FAKE_DIR/child.pid"; wait ;;
  stop) echo "$2" >> "$FAKE_DIR/stopped" ;;
  list) echo '{"runs": [{"run-id": "42", "status": "running"}]}' ;;
esac
"""


def test_a_bench_timeout_stops_the_cli_its_children_and_the_run(tmp_path, monkeypatch):
    """bench's flwr_run killed only the CLI on timeout (subprocess.run): the run went on in the
    SuperLink and anything the CLI started lived on. Now its process group is stopped and the run
    is stopped by the id read from the streamed output."""
    import os

    from bench import flower_sim

    (tmp_path / "flwr").write_text(FAKE_FLWR)
    (tmp_path / "flwr").chmod(0o755)
    monkeypatch.setattr(flower_sim, "BIN", tmp_path)
    link = flower_sim.SimulationLink({**os.environ, "FAKE_DIR": str(tmp_path)}, pid=0, log=tmp_path / "log")
    t0 = time.monotonic()
    try:
        flower_sim.flwr_run(link, tmp_path, {"num-rounds": 1}, num_supernodes=2, timeout_s=3)
        raise AssertionError("flwr_run returned although the CLI hung")
    except TimeoutError as exc:
        assert "42" in str(exc)
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "stopped").read_text().split() == ["42"]
    child = int((tmp_path / "child.pid").read_text())
    alive, deadline = True, time.monotonic() + 10
    while alive and time.monotonic() < deadline:
        try:
            os.kill(child, 0)  # a stopped child is reaped by init within moments
            time.sleep(0.2)
        except ProcessLookupError:
            alive = False
    assert not alive, "a process the CLI started outlived the timeout"


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
