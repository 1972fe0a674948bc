"""Run the real app through Flower's simulation runtime, with every process stopped by PID.

``flwr run`` lazily starts a detached SuperLink that outlives it; tests instead start that same
SuperLink themselves (Flower's own flags, a throw-away ``FLWR_HOME``, free ports), so they know
its PID and stop its whole process group afterwards.  A run counts as passed only when
``flwr list`` reports ``finished:completed``: ``flwr run`` returns 0 even when the run fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.processes import (  # noqa: F401 (free_port, stop_group re-exported)
    BIN,
    flwr_base_env,
    free_port,
    start,
    stop_group,
    stream_until,
    toml_value,
    wait_healthy,
)


@dataclass
class SimulationLink:
    env: dict[str, str]
    pid: int
    log: Path


def flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = flwr_base_env(flwr_home)
    env.update(
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        RAY_DEDUP_LOGS="0",
    )
    return env


@contextmanager
def simulation_superlink(flwr_home: Path, cwd: Path):
    http_port, control_port = free_port(), free_port()
    env = flwr_env(flwr_home, http_port, control_port)
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    log = runtime / "superlink.out"
    cmd = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--database",
        str(runtime / "state.db"),
    ]
    proc = start(cmd, log, env, cwd=cwd)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{http_port}/health", log)
        yield SimulationLink(env, proc.pid, log)
    finally:
        stop_group(proc)


@dataclass
class RunOutcome:
    run_id: str
    status: str
    details: str
    output: str


def flwr_run(
    link: SimulationLink, app_dir: Path, run_config: dict, num_supernodes: int, timeout_s: float = 900
) -> RunOutcome:
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    cmd = [
        str(BIN / "flwr"),
        "run",
        str(app_dir),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        "--run-config",
        overrides,
    ]
    # the CLI in its own session, its output read as it streams: at the deadline its whole process
    # group is stopped and the run itself stopped by the id it printed (a run left going in the
    # SuperLink would skew every later timing), even when the CLI prints nothing while it hangs
    proc = subprocess.Popen(
        cmd,
        env=link.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    timed_out = stream_until(proc, time.monotonic() + timeout_s, lines.append)
    out = "".join(lines)
    m = re.search(r"Successfully started run (\d+)", out)
    if timed_out:
        stopped = stop_running_runs(link) if m is None else [m.group(1)] * bool(stop_run(link, m.group(1)))
        raise TimeoutError(
            f"flwr run passed its {timeout_s:.0f} s timeout; its process group and run(s) "
            f"{stopped or 'none'} were stopped"
        )
    proc.wait()
    if not m:
        raise AssertionError(f"flwr run did not start a run (exit {proc.returncode}):\n{out[-4000:]}")
    run_id = m.group(1)
    status, details = run_status(link, run_id)
    return RunOutcome(run_id, status, details, out)


def list_runs(link: SimulationLink) -> list[dict]:
    """The SuperLink's runs as ``flwr list --format json`` reports them."""
    res = subprocess.run(
        [str(BIN / "flwr"), "list", "--format", "json"],
        env=link.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(res.stdout)["runs"]


def run_status(link: SimulationLink, run_id: str, wait_s: float = 60) -> tuple[str, str]:
    deadline = time.monotonic() + wait_s
    while True:
        run = next(r for r in list_runs(link) if r["run-id"] == run_id)
        if run["status"].startswith("finished") or time.monotonic() > deadline:
            return run["status"], run.get("status-details", "")
        time.sleep(1)


def stop_run(link: SimulationLink, run_id: str) -> bool:
    res = subprocess.run(
        [str(BIN / "flwr"), "stop", run_id], env=link.env, capture_output=True, text=True, timeout=60
    )
    return res.returncode == 0


def stop_running_runs(link: SimulationLink) -> list[str]:
    """Stop every run of this SuperLink that has not finished (the bench runs one at a time)."""
    try:
        runs = list_runs(link)
    except (ValueError, KeyError):
        return []
    return [
        r["run-id"] for r in runs if not r["status"].startswith("finished") and stop_run(link, r["run-id"])
    ]
