"""Processes we start are stopped by PID, including what they started in sessions of their own
(Flower's SuperExec and the simulation do that): nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import time

from deploy.processes import descendants, stop_group


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_stop_group_stops_children_in_other_sessions():
    proc = subprocess.Popen(["bash", "-c", "setsid sleep 300 & sleep 300"], start_new_session=True)
    deadline = time.monotonic() + 10
    tree: list[int] = []
    while len(tree) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        tree = descendants(proc.pid)
    assert len(tree) == 2
    assert len({os.getsid(p) for p in tree}) == 2  # one of them left the group's session
    stop_group(proc, grace_s=3)
    assert proc.poll() is not None
    assert not [p for p in tree if _alive(p)]
