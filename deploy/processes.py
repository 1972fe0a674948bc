"""Processes this project starts (SuperLink, SuperNodes): free ports, health waits, stop by PID.

Every process is started in its own session, so stopping it by its PID (``os.killpg`` on its own
process group) also stops what it started (SuperExec, ClientApp/ServerApp subprocesses) and
nothing else: no process is ever looked up or stopped by name.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session with stdout and stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(
    proc: subprocess.Popen, url: str, log: Path, *, cafile: str | None = None, timeout_s: float = 60
) -> None:
    """Poll ``url`` until it answers 2xx (TLS verified against ``cafile`` when given); fail with the
    log's tail if the process exits first."""
    verify = ssl.create_default_context(cafile=cafile) if cafile else True
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{Path(proc.args[0]).name} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=0.5, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s (log: {log})")
        time.sleep(0.3)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (psutil, by parent ids: a process group is not enough, Flower's
    SuperExec starts its own session, and the simulation, Ray and the ClientApps live under it)."""
    try:
        return [c.pid for c in psutil.Process(root).children(recursive=True)]
    except psutil.Error:  # root ended while we looked
        return []


def stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Stop a process and everything it started, by PID: its own process group and every process
    below it in the process tree (found before anything is stopped, since orphans lose their parent)."""
    tree = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group (superexec, app processes)
    except ProcessLookupError:
        pass
    _stop_pids(tree, grace_s)  # what lives in other sessions (the simulation, Ray, its workers)
    if proc.poll() is None:
        proc.wait(5)


def _stop_pids(pids: list[int], grace_s: float) -> None:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def flwr_base_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process we start: nothing phones home or installs."""
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_WAIT_POLICY="PASSIVE",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def toml_value(v) -> str:
    """A Python value as a TOML literal for ``--run-config``/``--node-config`` overrides."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def stop_children_on_sigterm():
    """Within this block SIGTERM (and SIGINT, which a shell ignores in background jobs) raise
    KeyboardInterrupt, so the ``finally``/``with`` blocks that stop our processes by PID run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, _raise_interrupt)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def register_node_key(public_key: Path, name: str, connection: str = "", env: dict | None = None) -> int:
    """``flwr supernode register`` one site's public key; returns the SuperLink's node id, or raises
    RuntimeError with Flower's own output."""
    cmd = [str(BIN / "flwr"), "supernode", "register", str(public_key), *([connection] if connection else [])]
    res = subprocess.run(
        [*cmd, "--name", name, "--format", "json"], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        return int(json.loads(res.stdout)["node-id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"registering {name}'s key failed:\n{res.stdout}{res.stderr}") from exc


def stream_until(proc: subprocess.Popen, deadline: float, on_line: Callable[[str], object]) -> bool:
    """Pass ``proc``'s output lines to ``on_line`` until it exits or ``deadline`` (monotonic) passes;
    at the deadline the process and its tree are stopped. A reader thread keeps the deadline even when
    the process prints nothing (a hang). Returns whether it timed out."""
    assert proc.stdout is not None
    pending: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, pending), daemon=True).start()
    while True:
        try:
            line = pending.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            line = ""
        if line is None:  # the stream ended: the process exited
            return False
        if line:
            on_line(line)
        if time.monotonic() > deadline:
            stop_group(proc)
            return True


def _pump(stream, out: queue.Queue) -> None:
    """Copy a process's output lines into ``out``; None marks the end of the stream."""
    for line in stream:
        out.put(line)
    out.put(None)
